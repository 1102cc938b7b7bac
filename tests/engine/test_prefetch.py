"""Prefetch: batches in order, the budgets that end a run, row weighing, errors and following."""

import threading
import time
from datetime import UTC, datetime

import pytest

from d1sync_dagster.clients.pgmq import QueueMessage
from d1sync_dagster.engine.prefetch import Prefetch

NOW = datetime.now(UTC)


class Queue:
    """An in-memory queue of messages 1..n read in msg_id order, recording what each read asked for."""

    def __init__(self, n: int, rows: int = 1) -> None:
        self.msgs = [QueueMessage(i, 0, NOW, {"rows": rows}) for i in range(1, n + 1)]
        self.asked: list[int] = []
        self.lock = threading.Lock()

    def read(self, qty: int) -> list[QueueMessage]:
        with self.lock:
            self.asked.append(qty)
            out, self.msgs = self.msgs[:qty], self.msgs[qty:]
            return out


def drain(p: Prefetch) -> list[int]:
    try:
        return [m.msg_id for batch in p for m in batch]
    finally:
        p.close()


def test_batches_arrive_in_order_and_an_empty_read_means_drained():
    q = Queue(25)
    p = Prefetch(q.read, batch_size=10)
    assert drain(p) == list(range(1, 26)) and p.drained


def test_the_message_budget_ends_the_run_without_draining():
    q = Queue(25)
    p = Prefetch(q.read, batch_size=10, max_messages=15)
    assert drain(p) == list(range(1, 16)) and not p.drained
    assert sum(q.asked) == 15


def test_a_deadline_in_the_past_reads_nothing():
    q = Queue(5)
    p = Prefetch(q.read, batch_size=10, deadline=time.monotonic() - 1)
    assert drain(p) == [] and not p.drained and q.asked == []


def test_heavy_messages_shrink_later_reads_to_the_row_budget():
    q = Queue(30, rows=100)
    p = Prefetch(q.read, batch_size=10, weigh=lambda ms: sum(m.message["rows"] for m in ms), max_rows=300)
    assert drain(p) == list(range(1, 31))
    assert q.asked[0] == 10 and set(q.asked[1:]) == {3}


def test_a_read_error_is_raised_in_the_consumer_after_the_batches_before_it():
    q = Queue(10)
    calls = []

    def read(qty):
        calls.append(qty)
        if len(calls) == 2:
            raise RuntimeError("connection lost")
        return q.read(qty)

    p = Prefetch(read, batch_size=5)
    seen = []
    with pytest.raises(RuntimeError, match="connection lost"):
        for batch in p:
            seen += [m.msg_id for m in batch]
    p.close()
    assert seen == [1, 2, 3, 4, 5]


def test_following_waits_for_a_producer_instead_of_ending():
    q = Queue(0)
    producing = threading.Event()
    producing.set()

    def produce():
        for i in range(1, 4):
            time.sleep(0.05)
            with q.lock:
                q.msgs.append(QueueMessage(i, 0, NOW, {}))
        producing.clear()

    t = threading.Thread(target=produce)
    t.start()
    p = Prefetch(q.read, batch_size=10, follow=producing.is_set)
    got = drain(p)
    t.join()
    # The queue was empty at the first read: without `follow` the run would have ended with nothing. A
    # message the producer adds just as it stops may be left for the next run (backfill runs one more apply).
    assert got and got + [m.msg_id for m in q.msgs] == [1, 2, 3] and p.drained
