"""Planning large read batches in a process of its own, off the apply's GIL.

Decoding a message (its JSON, then its values) and planning the batch are pure Python, and with the
reader and the D1 worker in the same interpreter they took turns on one GIL. A `Planner` hands a batch of
trigger changes, as the JSON text Postgres sent, to a child process that decodes and plans it
(`core/batch.plan_batch`, the same function) and returns the statements, the poison and each message's
table. The apply's process then only reads, sends to D1 and deletes.

- Only batches of trigger changes go there, and only large ones (`MIN_MESSAGES`): a backfill's chunks are
  already planned on the fast path, and a few changes (the streaming apply's usual batch) are planned
  sooner at home than sent away.
- The child is `python -m d1sync_dagster.engine.planner` (not `multiprocessing`, which would import the
  caller's main script again in the child). It is started by the first large batch read, and batches
  handed over while it starts wait for it (its imports take a fraction of a second; one not ready within
  `Planner.START_SECONDS` is given up). If it ever fails, its batches and all later ones are planned at
  home, so a drain never depends on it.
- The child is pure: no connection, no lock, no D1. What it returns is what `plan_batch` returns in the
  parent for the same messages; nothing is applied or deleted but by the parent, in the same order.
- Frames on its stdin and stdout are length-prefixed pickles between this process and the child it
  started (nothing else writes to those pipes).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from d1sync_dagster.core.batch import PlannedBatch, plan_batch
from d1sync_dagster.core.shards import ShardRule
from d1sync_dagster.core.tables import PlainSchema
from d1sync_dagster.engine.tuning import GC_THRESHOLD
from d1sync_dagster.exactjson import loads_exact

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema

log = logging.getLogger(__name__)

#: Batches with fewer messages are planned at home.
MIN_MESSAGES = 1000

_HEADER = struct.Struct("!Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the planner process ended")
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the planner process ended")
    return pickle.loads(data)  # noqa: S301 - frames from the process this module started


#: What the child keeps of the environment: enough to run this Python, nothing else (no database URL, no
#: token: it needs none).
_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONHOME", "VIRTUAL_ENV")


def _child_environment() -> dict[str, str]:
    """The child's environment: `_KEPT`, and this very copy of d1sync first on its path."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {k: v for k, v in os.environ.items() if k in _KEPT} | {"PYTHONPATH": path}


class _Msg(NamedTuple):
    msg_id: int
    message: Any


class Planner:
    """A child process that plans batches, in the order they are handed over; `close()` ends it.

    Batches may be handed over from the start: they wait in the pipe while the child starts. A writer thread
    owns the child's stdin, so handing a batch over never blocks (on a busy child, on a full pipe), and a
    collector thread hands each answer to the batch waiting longest (the child answers in order)."""

    #: A child not ready by then is given up (killed): its batches, and all later ones, are planned at home.
    START_SECONDS = 30.0

    def __init__(self, schema: Schema, rules: Mapping[str, ShardRule]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "d1sync_dagster.engine.planner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_environment(),
        )
        self._ready = threading.Event()
        self._broken = False
        self._closed = False
        self._lock = threading.Lock()  # the waiting futures, the frames' order and the broken flag
        self._waiting: deque[Future[PlannedBatch | None]] = deque()
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._outbox.put((PlainSchema.of(schema), dict(rules)))  # first; the child never loads pydantic
        threading.Thread(target=self._write, name="d1sync-planner-write", daemon=True).start()
        threading.Thread(target=self._collect, name="d1sync-planner", daemon=True).start()
        self._start_timer = threading.Timer(self.START_SECONDS, self._not_started)
        self._start_timer.daemon = True
        self._start_timer.start()

    def _write(self) -> None:
        """Write the frames handed over, in order, until `close()`; then close the child's stdin (its end)."""
        assert self._proc.stdin is not None
        try:
            while (frame := self._outbox.get()) is not None:
                if not self._closed:
                    _send(self._proc.stdin, frame)
            self._proc.stdin.close()
        except (OSError, ValueError, pickle.PickleError) as e:
            self._fail(e)

    def _collect(self) -> None:
        assert self._proc.stdout is not None
        try:
            if _receive(self._proc.stdout) != "ready":
                raise EOFError("the planner process did not start")
            self._start_timer.cancel()
            self._ready.set()
            while True:
                out = _receive(self._proc.stdout)
                with self._lock:
                    if self._broken:
                        return  # given up (a frame could not be written): its batches are planned at home
                    waiting = self._waiting.popleft()
                if isinstance(out, BaseException):
                    waiting.set_exception(out)
                else:
                    waiting.set_result(out)
        except (OSError, EOFError, ValueError, pickle.PickleError) as e:
            self._fail(e)

    def _not_started(self) -> None:
        if not self._ready.is_set():
            self._fail(TimeoutError(f"not ready after {self.START_SECONDS:g} s"))
            self._proc.kill()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if not self._broken and not self._closed:
                log.warning("planning in this process from now on: the planner process failed (%s)", error)
            self._broken = True
            waiting, self._waiting = self._waiting, deque()
        for f in waiting:  # planned at home instead
            f.set_result(None)

    @property
    def outstanding(self) -> int:
        """Batches handed over and not yet answered."""
        return len(self._waiting)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._broken

    def takes(self, msgs: Sequence[Any]) -> bool:
        """Whether this batch goes to the child: large, of messages still in their JSON text, and the child
        has not failed (it may still be starting)."""
        return len(msgs) >= MIN_MESSAGES and not self._broken and all(m.message.__class__ is bytes for m in msgs)

    def submit(self, msgs: Sequence[Any]) -> Future[PlannedBatch | None]:
        """Hand a batch over (never blocks); its future holds the planned batch, or None when the child
        failed (the caller then plans it at home)."""
        future: Future[PlannedBatch | None] = Future()
        items = [(m.msg_id, m.message) for m in msgs]
        with self._lock:  # a batch's frame goes out in the order its future waits
            if self._broken:
                future.set_result(None)
            else:
                self._waiting.append(future)
                self._outbox.put(items)
        return future

    def peak_mb(self) -> float | None:
        """The child's peak resident memory so far (its `VmHWM`; Linux only, else None). Not `getrusage`'s
        `RUSAGE_CHILDREN`: Linux counts in it the parent's resident size at the moment of the spawn, which
        the child never used."""
        return resident_peak_mb(self._proc.pid)

    def close(self) -> None:
        """End the child: frames not yet written are dropped, and it ends when its stdin closes."""
        self._closed = True
        self._start_timer.cancel()
        self._outbox.put(None)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def resident_peak_mb(pid: int | str = "self") -> float | None:
    """A process's peak resident memory in MB (`VmHWM` in `/proc/<pid>/status`); None where Linux does not
    tell (another system, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child: the schema and rules, then batches of (msg_id, JSON text) until stdin closes."""
    schema, rules = _receive(stdin)
    # The interpreter tuning of `engine/tuning.py`, for this process's whole life: a batch allocates
    # hundreds of thousands of short-lived, acyclic objects, which the default threshold (700) had the
    # collector scan again and again. What was imported is frozen out of the collector's way.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    _send(stdout, "ready")
    while True:
        try:
            items = _receive(stdin)
        except EOFError:
            return
        try:
            out: Any = plan_batch(schema, [_Msg(i, loads_exact(t)) for i, t in items], rules or None)
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            out = e
        _send(stdout, out)


if __name__ == "__main__":
    try:
        _serve(sys.stdin.buffer, sys.stdout.buffer)
    except (BrokenPipeError, EOFError):
        pass  # the parent went away (it ended, or was killed): nothing is left to plan for
