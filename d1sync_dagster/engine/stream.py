"""The streaming apply: one long apply that follows the queue and applies each change within a fraction of a
second of its commit, for a set time, then ends (so that a new run picks up new code and configuration).

It is `apply` with `follow`: the consumer lock is held for the whole run, and on an empty queue the reader
waits on a `ChangeListener` (woken by the notification the capture triggers send at commit, or polling where
notifications cannot arrive) instead of ending. The apply runs on a thread of its own; the caller's thread
receives, every `record_every_seconds` at most, what landed since the last `Landed` per table (only tables
that changed), so that Dagster events are only ever written from the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import ChangeListener, PgmqClient, QueueMessage
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.reports import ApplyReport, TableStats
from d1sync_dagster.schema import Schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOptions:
    #: How long the run follows the queue before it ends by itself.
    seconds: float = 900.0
    #: How often an idle run looks at the queue without being notified (the only wake-up through a
    #: transaction pooler).
    poll_seconds: float = 1.0
    #: Materializations are recorded at most this often (a busy table would otherwise get one per batch;
    #: each is a row in Dagster's event log, with its checks).
    record_every_seconds: float = 60.0
    #: While another consumer holds the lock, try again (every 0.1 s) for this long before giving up: the
    #: successor of a streaming run starts before its predecessor ends and takes over the moment it does.
    wait_for_lock_seconds: float = 0.0


@dataclass
class Landed:
    """What was applied since the previous `Landed`: per table that changed, and the run's totals so far."""

    tables: dict[str, TableStats]
    totals: ApplyReport
    final: bool = False
    #: How the run waits for changes (notifications or polling, and why).
    wake: str = ""
    #: Set once, on an item of its own: when (time.time()) the run took the consumer lock and began to follow.
    following_since: float | None = None


@dataclass
class _Window:
    """Accumulates the batches applied between two records (the apply thread adds, the caller takes).

    Messages are counted per landed batch (the running report counts a batch's messages when it is planned,
    which may be before the previous batch landed); the other figures are counted as a batch is sent, so a
    copy taken after each batch is exact for them."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    landed: dict[str, TableStats] = field(default_factory=dict)
    previous: dict[str, TableStats] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    oldest: dict[str, float] = field(default_factory=dict)

    def add(self, report: ApplyReport, msgs: list[QueueMessage], tables: dict[int, str | None]) -> None:
        now = datetime.now(UTC)
        with self.lock:
            self.landed = {name: replace(t) for name, t in report.tables.items()}
            for m in msgs:
                name = tables.get(m.msg_id)
                if name is None:
                    continue
                self.messages[name] = self.messages.get(name, 0) + 1
                age = (now - m.enqueued_at).total_seconds()
                self.oldest[name] = max(self.oldest.get(name, 0.0), age)

    def take(self) -> dict[str, TableStats]:
        with self.lock:
            out: dict[str, TableStats] = {}
            for name, now in self.landed.items():
                before = self.previous.get(name, TableStats())
                delta = TableStats(**{f.name: getattr(now, f.name) - getattr(before, f.name) for f in _COUNTED})
                delta.messages = self.messages.get(name, 0)
                if delta.messages or delta.truncates or delta.dead_lettered:
                    delta.lag_seconds = self.oldest.get(name)
                    out[name] = delta
            self.previous = self.landed
            self.messages, self.oldest = {}, {}
            return out


_COUNTED = [f for f in fields(TableStats) if f.name not in ("lag_seconds", "messages")]


def follow_queue(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    options: StreamOptions | None = None,
    apply_options: ApplyOptions | None = None,
    *,
    stop: threading.Event | None = None,
) -> Iterator[Landed]:
    """Apply changes as they come for `options.seconds` (or until `stop` is set), yielding what landed.

    The last item has `final=True` and the run's totals (`totals.skipped` says why nothing ran when another
    consumer held the lock). An error of the apply is raised here, after what landed before it was yielded.
    Leaving the generator early (or an exception in the caller) stops the apply after its batch in hand.
    """
    options = options or StreamOptions()
    stop = stop or threading.Event()
    window = _Window()
    done: queue.Queue[ApplyReport | BaseException] = queue.Queue()
    listener = ChangeListener(pg, poll_seconds=options.poll_seconds)
    log.info("streaming apply for %gs, %s", options.seconds, listener.mode)
    began: list[float] = []  # time.monotonic() when the lock was taken: the run's time counts from there

    def idle() -> None:
        """Until notified, `poll_seconds` passed, the run's end or a stop (looked at every 0.25 s)."""
        deadline = (began[0] if began else time.monotonic()) + options.seconds
        end = min(time.monotonic() + options.poll_seconds, deadline)
        while not stop.is_set() and (left := end - time.monotonic()) > 0:
            if listener.wait(min(left, 0.25)):
                return

    following = replace(
        apply_options or ApplyOptions(),
        follow=lambda: not stop.is_set(),
        idle=idle,
        stopped=stop.is_set,
        max_seconds=options.seconds,
        max_messages=None,
        vacuum_dead_rows=None,  # a long run leaves the queue table to autovacuum
    )

    totals = ApplyReport()  # replaced by the apply's own report as soon as a batch lands
    locked_at: list[float] = []

    also = following.on_batch_messages  # the caller's own (the Dagster run's changed keys)

    def landed(report: ApplyReport, msgs: list[QueueMessage], tables: dict[int, str | None]) -> None:
        nonlocal totals
        totals = report
        if also is not None:
            also(report, msgs, tables)
        window.add(report, msgs, tables)

    def run() -> None:
        def on_locked() -> None:
            began.append(time.monotonic())
            locked_at.append(time.time())

        options_here = replace(following, on_batch_messages=landed, on_locked=on_locked)
        give_up = time.monotonic() + options.wait_for_lock_seconds
        try:
            while True:
                report = apply(pg, d1, schema, options_here)
                if report.skipped and time.monotonic() < give_up and not stop.is_set():
                    time.sleep(0.1)  # a predecessor still follows the queue: take over when it lets go
                    continue
                done.put(report)
                return
        except BaseException as e:  # raised in the caller's thread
            done.put(e)

    thread = threading.Thread(target=run, name="d1sync-stream", daemon=True)
    thread.start()
    announced = False
    try:
        while True:
            if locked_at and not announced:
                announced = True
                yield Landed({}, totals, wake=listener.mode, following_since=locked_at[0])
            try:
                result = done.get(timeout=options.record_every_seconds if announced else 0.1)
            except queue.Empty:
                if announced and (changed := window.take()):  # (the run's start is announced first)
                    yield Landed(changed, totals, wake=listener.mode)
                continue
            if isinstance(result, BaseException):
                if changed := window.take():
                    yield Landed(changed, totals, wake=listener.mode)
                raise result
            yield Landed(window.take(), result, final=True, wake=listener.mode)
            return
    finally:
        stop.set()
        thread.join()
        listener.close()
