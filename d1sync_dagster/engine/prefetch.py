"""Read-ahead of queue batches on a background thread, so Postgres reads overlap decoding and D1 requests."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from d1sync_dagster.clients.pgmq import QueueMessage

_DRAINED, _BUDGET = object(), object()
T = TypeVar("T")


class Prefetch:
    """Yields read batches in msg_id order, reading at most `depth` batches ahead.

    Stops at an empty read (`drained` becomes True), at `max_messages` read, or at `deadline` (monotonic).
    When messages carry many rows each (backfill chunks, weighed by `weigh`), later reads ask for fewer
    messages so a batch holds about `max_rows` rows, which bounds memory. While `follow()` is true an empty
    read waits for more instead of ending (a backfill producing chunks concurrently, the streaming apply),
    by calling `idle()` (which returns when more may have come), else 20 ms. `stopped()` true ends it like
    the deadline.
    A read error is raised in the consuming thread. The reading connection is used by this thread only
    until `close()` returns.
    """

    def __init__(
        self,
        read: Callable[[int], list[QueueMessage]],
        *,
        batch_size: int,
        max_messages: int | None = None,
        deadline: float | None = None,
        depth: int = 2,
        weigh: Callable[[list[QueueMessage]], int] | None = None,
        max_rows: int | None = None,
        follow: Callable[[], bool] | None = None,
        idle: Callable[[], None] | None = None,
        stopped: Callable[[], bool] | None = None,
    ) -> None:
        self._read, self._batch, self._max, self._deadline = read, batch_size, max_messages, deadline
        self._weigh, self._max_rows, self._follow = weigh, max_rows, follow
        self._idle, self._stopped = idle, stopped
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.drained = False
        self._thread = threading.Thread(target=self._run, name="d1sync-read", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        total = 0
        size = self._batch
        try:
            while not self._stop.is_set():
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return self._put(_BUDGET)
                if self._stopped is not None and self._stopped():
                    return self._put(_BUDGET)
                qty = size if self._max is None else min(size, self._max - total)
                if qty <= 0:
                    return self._put(_BUDGET)
                msgs = self._read(qty)
                if not msgs:
                    if self._follow is not None and self._follow():
                        if self._idle is not None:
                            self._idle()  # the streaming apply: until notified or its poll interval
                        else:
                            time.sleep(0.02)  # a backfill's producer is still writing: wait for more
                        continue
                    return self._put(_DRAINED)
                total += len(msgs)
                if self._weigh is not None and self._max_rows is not None:
                    rows_per_message = self._weigh(msgs) / len(msgs)
                    size = max(1, min(self._batch, int(self._max_rows / rows_per_message)))
                self._put(msgs)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self) -> Iterator[list[QueueMessage]]:
        while True:
            item = self._queue.get()
            if item is _DRAINED:
                self.drained = True
                return
            if item is _BUDGET:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def read_ahead(items: Iterator[T], *, name: str) -> Iterator[T]:
    """Yield `items`, producing the next one on a background thread while the caller works on this one
    (reconcile reads the next D1 chunk while it compares the current one with Postgres). At most two items
    exist at once besides the caller's. An error is raised in the caller; leaving early stops the thread
    after the item it is producing."""
    out: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object, error: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                out.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DRAINED)
        except BaseException as e:  # handed to the caller
            put(None, e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if error is not None:
                raise error
            if item is _DRAINED:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
