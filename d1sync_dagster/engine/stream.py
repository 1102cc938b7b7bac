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
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client, sharing
from d1sync_dagster.clients.d1_shards import all_databases
from d1sync_dagster.clients.pgmq import ChangeListener, PgmqClient, QueueMessage
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.reports import ApplyReport, TableStats
from d1sync_dagster.errors import D1Error, QueueError
from d1sync_dagster.schema import Schema

log = logging.getLogger(__name__)


#: The share of the D1 API's request budget the stream spends, evenly over the window (the rest is left to
#: checks, the CLI, wrangler and the dashboard, which share the token).
STREAM_SHARE = 0.8

#: A transient failure (D1 or Postgres) is retried after this long, doubling up to the maximum: changes flow
#: again at most that long after D1 or Postgres is back (a retry costs one request of the API's budget, 150
#: in 5 minutes at 2 s, an eighth of it).
FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS = 0.5, 2.0


def _transient(e: D1Error | QueueError) -> bool:
    """Whether the stream should wait the failure out: D1 failed for a moment (or is locked, read-only,
    overloaded, rate limited), or Postgres dropped the connection (a restart, a terminated backend, a
    failover) or lost the consumer lock with it."""
    if isinstance(e, D1Error):
        return e.retryable
    state = e.sqlstate or ""
    return e.transient or state.startswith(("08", "57P")) or state == "" or "lock was lost" in str(e)


def _reconnect_if_broken(pg: PgmqClient) -> None:
    try:
        pg.execute("SELECT 1")
    except QueueError:
        try:
            pg.reconnect()
        except QueueError as e:  # still down: the next try says so
            log.warning("streaming apply: Postgres is not back yet (%s)", e)


#: Every this many tries, a standby makes sure it still holds the standby lock (a terminated connection
#: loses it; the sensor would take the standby for dead).
STANDBY_CHECK_EVERY = 20


@contextmanager
def _keeping_queue(pg: PgmqClient) -> Iterator[bool]:
    """The consumer lock, held through a retry's wait and the next attempt (whose apply finds it held), so that
    the standby run does not take the queue over from a run that only waits out a fault: a takeover costs the
    standby's start-up on top of the wait. Not taken (Postgres still down, or another took it): nothing."""
    with ExitStack() as stack:
        try:
            got = stack.enter_context(pg.consumer_lock())
        except QueueError as e:
            log.warning("streaming apply: the queue's lock is not kept through the wait (%s)", e)
            got = False
        yield got


def _standing(pg: PgmqClient) -> bool:
    holders = pg.lock_holders(standby=True)
    mine = f"(pid {os.getpid()})"
    return any(mine in app for _pid, app, _since in holders)


#: How often a standby tries the consumer lock (one statement each): how soon it takes over from a run that
#: ended or died.
WAIT_SECONDS = 0.25


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
    carried: dict[str, TableStats] = field(default_factory=dict)

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

    def restart(self) -> None:
        """The apply starts again (after a transient failure) with a report of its own: what landed and was
        not taken yet is carried over."""
        with self.lock:
            for name, now in self.landed.items():
                before = self.previous.get(name, TableStats())
                carry = self.carried.setdefault(name, TableStats())
                for f in _COUNTED:
                    setattr(carry, f.name, getattr(carry, f.name) + getattr(now, f.name) - getattr(before, f.name))
            self.landed, self.previous = {}, {}

    def take(self) -> dict[str, TableStats]:
        with self.lock:
            out: dict[str, TableStats] = {}
            for name in self.landed.keys() | self.carried.keys():
                now = self.landed.get(name, TableStats())
                before = self.previous.get(name, TableStats())
                carry = self.carried.get(name, TableStats())
                delta = TableStats(
                    **{
                        f.name: getattr(now, f.name) - getattr(before, f.name) + getattr(carry, f.name)
                        for f in _COUNTED
                    }
                )
                delta.messages = self.messages.get(name, 0)
                if delta.messages or delta.truncates or delta.dead_lettered:
                    delta.lag_seconds = self.oldest.get(name)
                    out[name] = delta
            self.previous = self.landed
            self.messages, self.oldest, self.carried = {}, {}, {}
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
    on_leave: Callable[[BaseException], None] | None = None,
) -> Iterator[Landed]:
    """Apply changes as they come for `options.seconds` (or until `stop` is set), yielding what landed.

    The last item has `final=True` and the run's totals (`totals.skipped` says why nothing ran when another
    consumer held the lock). An error of the apply is raised here, after what landed before it was yielded.
    Leaving the generator early (or an exception in the caller) stops the apply after its batch in hand;
    `on_leave` is called with that exception first, while the lock is still held (the Dagster run tags
    itself as stopping, so that the sensor does not take it for dead).
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

    earlier: list[ApplyReport] = []  # what the applies before a transient failure did (one, summed)
    attempt: list[ApplyReport] = []  # the running report of the apply in hand, once a batch landed

    def landed(report: ApplyReport, msgs: list[QueueMessage], tables: dict[int, str | None]) -> None:
        nonlocal totals
        attempt[:] = [report]
        totals = earlier[0].plus(report) if earlier else report
        if also is not None:
            also(report, msgs, tables)
        window.add(report, msgs, tables)

    def run() -> None:
        standing, stood = ExitStack(), []

        def on_locked() -> None:
            standing.close()  # no longer standing by
            began.append(time.monotonic())
            locked_at.append(time.time())

        options_here = replace(following, on_batch_messages=landed, on_locked=on_locked)
        give_up = time.monotonic() + options.wait_for_lock_seconds
        backoff = FIRST_BACKOFF_SECONDS
        try:
            # Paced over the API's window (Ratelimit headers): a request every window / (share of what is
            # left), so that many small transactions share requests instead of spending the budget in a burst
            # and then waiting out the window (each page then carries what arrived meanwhile).
            kept = ExitStack()  # the consumer lock through a retry's wait (`_keeping_queue`)
            with standing, kept, sharing([c for _, c in all_databases(d1)], STREAM_SHARE):
                while True:
                    if began:  # again after a failure: only the run's time left
                        left = began[0] + options.seconds - time.monotonic()
                        options_here = replace(options_here, max_seconds=max(left, 0.0), on_locked=None)
                    attempt.clear()
                    try:
                        report = apply(pg, d1, schema, options_here)
                    except (D1Error, QueueError) as e:
                        now = time.monotonic()
                        over = now >= began[0] + options.seconds if began else now >= give_up
                        if not _transient(e) or stop.is_set() or over:
                            raise
                        # Waited out here, not a reason to end the run: the batch in hand was not deleted, so it
                        # is applied again (D1's upserts are idempotent) once D1 or Postgres answers.
                        if attempt:  # batches landed since the last failure: this is a new one
                            backoff = FIRST_BACKOFF_SECONDS
                        log.warning("streaming apply: %s; trying again in %.1fs", e, backoff)
                        window.restart()
                        if attempt:
                            earlier[:] = [earlier[0].plus(attempt[0]) if earlier else attempt[0]]
                        _reconnect_if_broken(pg)
                        kept.close()
                        if began:  # following the queue: keep it through the wait
                            kept.enter_context(_keeping_queue(pg))
                        stop.wait(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                        continue
                    if report.skipped and time.monotonic() < give_up and not stop.is_set() and not began:
                        # Another run follows the queue: stand by, and take over the moment it lets go (it
                        # ends, or dies and its connection with it). The standby lock says this run is alive.
                        if not stood or (len(stood) % STANDBY_CHECK_EVERY == 0 and not _standing(pg)):
                            standing.close()  # (its connection was terminated: take the standby lock again)
                            standing.enter_context(pg.standby_lock())
                        stood.append(True)
                        time.sleep(WAIT_SECONDS)
                        continue
                    if report.skipped and began and not stop.is_set() and time.monotonic() < give_up:
                        time.sleep(WAIT_SECONDS)  # after a failure another consumer took the lock: wait for it
                        continue
                    done.put(earlier[0].plus(report) if earlier else report)
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
    except BaseException as e:
        if on_leave is not None and not isinstance(e, GeneratorExit):
            on_leave(e)
        raise
    finally:
        stop.set()
        thread.join()
        listener.close()
