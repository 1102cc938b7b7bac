"""Incremental apply: drain the PGMQ queue into D1, exactly and cheaply.

Per read batch (the oldest messages not yet claimed by this run, in msg_id order, under the consumer lock
so two applies never run at once): decode -> coalesce per key -> plan statements -> one D1 batch request
(more only when the body budget is exceeded) -> then, in one Postgres transaction, dead-letter the poison
and delete the batch's messages.

Invariants:
- Nothing is deleted from the queue before it was applied to D1 or copied to the dead-letter queue.
- Messages apply in msg_id order, also after a crash. Reads do not hide messages (no visibility timeout, see
  `PgmqClient.read_in_order`): the run itself keeps the ids it has read and not yet finished (`_Claimed`)
  and reads past exactly those, releasing them only once their delete has committed. So no message is read
  twice in a run, none is skipped (one whose transaction commits late, below ids already read, is read
  next), and a run after a crash starts again at the oldest message, with nothing to wait for.
- A crash between the D1 commit and the delete replays the batch; every statement is idempotent, so the
  replay leaves D1 as it was.
- A change D1 refuses is isolated by splitting the batch in halves (applied in order, so per-key order is
  kept), dead-lettered with D1's reason, and the rest applies. A retryable failure (429/5xx/unreachable after
  the client's retries) stops the run with the messages left in the queue for the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import ShardedD1, rules_of
from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core.batch import PlannedBatch, Rules, plan_batch
from d1sync_dagster.core.changes import Poison
from d1sync_dagster.core.messages import message_rows
from d1sync_dagster.core.statements import Statement
from d1sync_dagster.engine.drift import Holding, hold_split
from d1sync_dagster.engine.maintenance import vacuum_queue
from d1sync_dagster.engine.pages import Page, TxnPages
from d1sync_dagster.engine.planner import MIN_MESSAGES, Planner
from d1sync_dagster.engine.prefetch import Prefetch
from d1sync_dagster.engine.publish import IsolationStopped, Prepared, commit, decoded
from d1sync_dagster.engine.ranges import RangeReader
from d1sync_dagster.engine.reports import ApplyReport, TableStats
from d1sync_dagster.engine.tuning import throughput
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.d1_ddl import upsert_meta

__all__ = ["ApplyOptions", "ApplyReport", "TableStats", "apply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyOptions:
    batch_size: int = 2000
    #: Ignored: apply no longer reads through pgmq.read, so nothing is hidden (see `_Claimed`). Kept so that
    #: callers (and `d1sync apply --vt`) that set it keep working.
    vt_seconds: int = 120
    max_messages: int | None = None
    max_seconds: float | None = None
    request_bytes: int = 2_000_000
    #: One source transaction goes to D1 whole in one request up to this size, past `request_bytes`
    #: (`engine/publish.py`); only a larger one is split (with a warning).
    transaction_bytes: int = 50_000_000
    #: Rows per batch when messages carry many rows (backfill chunks); bounds memory.
    max_rows_per_batch: int = 20_000
    #: While this returns True, an empty queue is waited on instead of ending the run (backfill).
    follow: Callable[[], bool] | None = None
    #: Called with the running report after each batch is applied and deleted (progress display).
    on_batch: Callable[[ApplyReport], None] | None = None
    #: Called with the running report, the batch's messages and each message's table after each batch is
    #: applied and deleted (the streaming run: what landed, and how old it was).
    on_batch_messages: Callable[[ApplyReport, list[QueueMessage], dict[int, str | None]], None] | None = None
    #: While `follow` holds, called on an empty queue; returns when changes may have arrived (streaming).
    idle: Callable[[], None] | None = None
    #: True ends the run after the batch in hand (the streaming run being stopped).
    stopped: Callable[[], bool] | None = None
    #: Called once the consumer lock is held, before the first read (the streaming run notes when it began).
    on_locked: Callable[[], None] | None = None
    #: D1 requests one run may spend isolating the transactions D1 refuses (bisection); see `engine/publish.py`.
    max_bisect_requests: int = 200
    #: After a run that drained the queue, VACUUM the queue table when Postgres counts at least this many
    #: dead rows in it (None: leave it to autovacuum). See `vacuum_queue`.
    vacuum_dead_rows: int | None = 100_000
    #: Plan large batches of trigger changes in a process of its own (`engine/planner.py`), started when
    #: the first large batch is read.
    planner_process: bool = True


def apply(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    options: ApplyOptions = ApplyOptions(),
    *,
    after_d1_commit: Callable[[list[int]], None] | None = None,
) -> ApplyReport:
    """Drain the queue (or stop at the message/time budget, or, not following the queue, at the backlog it
    found: `ApplyReport.caught_up`); returns figures per table.

    Pipelined in three stages: a reader thread reads batches ahead (on this connection; the consumer
    lock is held on one of its own), this thread decodes and plans them, and a worker thread sends each to
    D1 and then deletes its messages (on a second connection). D1 requests stay strictly sequential, a
    batch's messages are deleted only after its D1 commit and proof that the lock is still held, and once
    a batch fails no later batch is sent. `after_d1_commit` is called with the batch's msg_ids between the
    D1 commit and the queue delete (tests use it to kill the process at the worst moment).
    """
    report = ApplyReport(tables={t.name: TableStats() for t in schema.tables})
    started = time.monotonic()
    with pg.consumer_lock() as got, throughput():
        if not got:
            report.skipped = "another apply is running on this queue"
            log.info("apply skipped: %s", report.skipped)
            return report
        if options.on_locked is not None:
            options.on_locked()
        holding = Holding(schema)
        holding.start(pg, pg.held_by_table())
        _release(pg, d1, schema, holding, report, options)
        deadline = None if options.max_seconds is None else started + options.max_seconds
        failed = threading.Event()
        with (
            pg.clone() as finisher,
            _Lazy(pg) as catalog,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="d1sync-d1") as pool,
        ):
            ranges = RangeReader(pg, schema, max_rows=options.max_rows_per_batch)
            claimed = _Claimed()
            planning = _Planning(schema, rules_of(d1), enabled=options.planner_process)
            read_size = _read_size(d1, options)
            if planning.enabled and read_size >= MIN_MESSAGES and pg.span() >= 2 * MIN_MESSAGES:
                planning.warm()  # a backlog: the planner process starts while the first batch is read

            pages = TxnPages(pg)
            positions: dict[int, str] = {}  # a batch's last msg_id -> the position it completes
            final: list[str] = []  # the snapshot of the last empty read
            backlog = _Backlog() if options.follow is None else None

            def read(qty: int) -> list[QueueMessage]:
                page = pages.read(qty, skip=claimed.ids(), as_text=planning.enabled)
                if backlog is not None and backlog.past(page):
                    report.caught_up = True
                    return []
                msgs = ranges.resolve(decoded(page.msgs, backfill_only=True))
                claimed.add(msgs)
                if msgs and page.position is not None:
                    positions[msgs[-1].msg_id] = page.position
                elif not msgs and page.position is not None:
                    final[:] = [page.position]
                planning.start(msgs)
                return msgs

            batches = Prefetch(
                read,
                batch_size=read_size,
                max_messages=options.max_messages,
                deadline=deadline,
                weigh=lambda msgs: sum(message_rows(m.message) for m in msgs),
                max_rows=options.max_rows_per_batch,
                follow=options.follow,
                idle=options.idle,
                # A batch that failed ends the reading: following the queue (streaming), no later batch would
                # come to surface the failure, the failed batch's messages being claimed, and it would stall.
                stopped=lambda: failed.is_set() or (options.stopped is not None and options.stopped()),
                # Two batches ahead: while the planner process plans one, the other waits for it or, when
                # the child is behind, is planned here (`_Planning.start`). Read batches are JSON text,
                # small next to what they decode to.
                depth=2,
            )
            in_flight: deque[Future[None]] = deque()
            try:
                for msgs in batches:
                    prepared = _prepare(schema, msgs, report, planning, holding, catalog, positions)
                    in_flight.append(
                        pool.submit(
                            _commit_and_finish,
                            d1,
                            finisher,
                            schema,
                            prepared,
                            report,
                            options,
                            failed,
                            after_d1_commit,
                            pg.check_consumer_lock,
                            claimed,
                        )
                    )
                    while len(in_flight) > 1:
                        in_flight.popleft().result()
                while in_flight:
                    in_flight.popleft().result()
                report.drained = batches.drained and not report.caught_up
                # Sharded: the databases a batch did not touch get the position at the drain's end too.
                moved = final and (final[0] != report.position or isinstance(d1, ShardedD1))
                if report.drained and report.batches and moved:
                    # Drained: D1 is complete up to the last empty read's snapshot (a transaction that
                    # changed nothing replicated is answered too, without waiting for the next change).
                    _position_only(d1, schema, final[0], report, options)
            finally:
                if in_flight:  # leaving on an error: queued batches must not run after it
                    failed.set()
                for f in in_flight:
                    f.cancel()
                batches.close()
                report.planner_peak_mb = planning.close()
        report.drift = {t: [d.describe() for d in found] for t, found in holding.drift.items()}
        if report.split_transactions:  # doctor says so until a later split replaces it
            when = datetime.now(UTC).isoformat(timespec="seconds")
            note = f"{report.split_transactions} in the run that ended {when}"
            d1.batch([Statement(upsert_meta(), ("last_split_transactions", note))])
        if report.drained and report.messages and options.vacuum_dead_rows is not None:
            vacuum_started = time.monotonic()
            report.vacuumed = vacuum_queue(pg, options.vacuum_dead_rows)
            report.vacuum_seconds = time.monotonic() - vacuum_started
    report.duration_seconds = time.monotonic() - started
    return report


def _read_size(d1: D1Client, options: ApplyOptions) -> int:
    """Messages per read. Spread over shards, a batch gives each database a part of it: reading as many
    times more as there are databases (within the rows bound) keeps the rows per D1 request, and so the
    requests per change against the account's API budget, about what one database gets."""
    if not isinstance(d1, ShardedD1):
        return options.batch_size
    databases = 1 + len(d1.shards)
    return max(options.batch_size, min(options.batch_size * databases, options.max_rows_per_batch))


class _Planning:
    """Where batches are planned: here, or in the planner process (`engine/planner.py`). With the planner
    enabled, messages are read as their JSON text, and the reader hands each large batch over as soon as it
    is read (`start`; the first one starts the process), so the child plans the next batch while this
    process sends the previous one. What is not handed over is decoded and planned here: small batches,
    and a batch read while the child still has `CHILD_AHEAD` batches to plan (then this process, waiting
    for the child otherwise, plans it meanwhile; the share each side plans follows their speeds)."""

    CHILD_AHEAD = 2

    def __init__(self, schema: Schema, rules: Rules, *, enabled: bool) -> None:
        self.schema, self.rules, self.enabled = schema, rules, enabled
        self.planner: Planner | None = None
        self._handed: dict[int, Future[PlannedBatch | None]] = {}

    def start(self, msgs: list[QueueMessage]) -> None:
        """In the reader: hand a large batch to the planner process (started by the first one)."""
        if not self.enabled or len(msgs) < MIN_MESSAGES:
            return
        if self.planner is None:
            self.planner = Planner(self.schema, self.rules)
        if self.planner.takes(msgs) and self.planner.outstanding < self.CHILD_AHEAD:
            self._handed[msgs[0].msg_id] = self.planner.submit(msgs)

    def warm(self) -> None:
        """Start the planner process now (its Python starts in about 50 ms), not at the first large batch."""
        if self.enabled and self.planner is None:
            self.planner = Planner(self.schema, self.rules)

    def plan(self, msgs: list[QueueMessage]) -> PlannedBatch:
        handed = self._handed.pop(msgs[0].msg_id, None) if msgs else None
        planned = handed.result() if handed is not None else None
        return planned if planned is not None else plan_batch(self.schema, decoded(msgs), self.rules)

    def close(self) -> float | None:
        """End the planner process; its peak memory in MB, when it ran."""
        if self.planner is None:
            return None
        peak = self.planner.peak_mb()
        self.planner.close()
        return peak


class _Lazy:
    """A connection of its own for the catalog checks of a running apply, opened when first needed (the
    reader and the worker each use theirs)."""

    def __init__(self, pg: PgmqClient) -> None:
        self._pg, self._conn = pg, None

    def __call__(self) -> PgmqClient:
        if self._conn is None:
            self._conn = self._pg.clone()
        return self._conn

    def __enter__(self) -> _Lazy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()


def _prepare(
    schema: Schema,
    msgs: list[QueueMessage],
    report: ApplyReport,
    planning: _Planning,
    holding: Holding,
    catalog: Callable[[], PgmqClient],
    positions: dict[int, str],
) -> Prepared:
    """Plan one read batch (`core.batch`, here or in the planner process), hold the changes of drifted tables
    (`engine/drift.py`; the rest is planned again without them), count it, and add the bookkeeping
    statements."""
    position = positions.pop(msgs[-1].msg_id, None) if msgs else None
    batch = planning.plan(msgs)
    first_bad: dict[str, int] = {}
    for p in batch.poison:
        if p.table is not None:
            first_bad[p.table] = min(p.msg_id, first_bad.get(p.table, p.msg_id))
    if set(first_bad) - holding.drifted or holding.due():
        holding.refresh(catalog())  # a change that cannot apply may be a migration that just ran
    held: list[QueueMessage] = []
    hold_from = holding.to_hold(first_bad)
    if hold_from:
        held_ids, _ = hold_split(list(batch.tables.items()), hold_from)
        if held_ids:
            held = [m for m in msgs if m.msg_id in held_ids]
            msgs = [m for m in msgs if m.msg_id not in held_ids]
            tables = batch.tables
            batch = plan_batch(schema, decoded(msgs), planning.rules)
            report.count_held(tables.get(m.msg_id) for m in held)
    now = datetime.now(UTC)
    report.count_messages(msgs, batch.tables, now)
    meta = [
        Statement(upsert_meta(), ("last_applied_at", now.isoformat(timespec="seconds"))),
        Statement(upsert_meta(), ("last_applied_msg_id", str((msgs or held)[-1].msg_id))),
    ]
    return Prepared(msgs, batch.poison, batch.planned, meta, batch.tables, held, position_statements(position))


def position_statements(position: str | None) -> list[Statement]:
    """The read-your-writes position a D1 commit records, in the same request (`core/txns.py`): the
    snapshot, and when it was recorded."""
    if position is None:
        return []
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [Statement(upsert_meta(), ("position", position)), Statement(upsert_meta(), ("position_at", now))]


def _position_only(d1: D1Client, schema: Schema, position: str, report: ApplyReport, options: ApplyOptions) -> None:
    commit(d1, schema, Prepared([], [], [], [], {}, position=position_statements(position)), report, options)
    report.position = position


def _release(
    pg: PgmqClient, d1: D1Client, schema: Schema, holding: Holding, report: ApplyReport, options: ApplyOptions
) -> None:
    """Apply the held changes of every table that no longer drifts, oldest first, before anything newer of
    theirs is read from the queue (the consumer lock is held). What still cannot apply is dead-lettered with
    its reason; nothing is dropped."""
    waiting = pg.held_by_table()
    ready = sorted(t for t in waiting if t in schema.by_name and t not in holding.drifted)
    if not ready:
        return
    log.warning(
        "applying %d held change(s) of %s: schema.json follows the source again",
        sum(waiting[t] for t in ready),
        ", ".join(ready),
    )
    while True:
        msgs = pg.read_held(ready, options.batch_size)
        if not msgs:
            return
        batch = plan_batch(schema, msgs, rules_of(d1))
        now = datetime.now(UTC)
        meta = [Statement(upsert_meta(), ("last_applied_at", now.isoformat(timespec="seconds")))]
        prepared = Prepared(msgs, batch.poison, batch.planned, meta, batch.tables)
        refused = commit(d1, schema, prepared, report, options)
        poison = batch.poison + refused
        with pg.transaction():
            if poison:
                pg.dead_letter([(p.msg_id, p.reason, p.table) for p in poison], source=pg.held)
            pg.finish([m.msg_id for m in msgs], queue=pg.held)
        report.count_dead_letters(poison)
        report.count_held((batch.tables.get(m.msg_id) for m in msgs), released=True)


def _commit_and_finish(
    d1: D1Client,
    finisher: PgmqClient,
    schema: Schema,
    p: Prepared,
    report: ApplyReport,
    options: ApplyOptions,
    failed: threading.Event,
    after_d1_commit: Callable[[list[int]], None] | None,
    check_lock: Callable[[], None],
    claimed: _Claimed,
) -> None:
    """D1 commit, then dead-letter and delete (worker thread; batches run one at a time, in order). The
    consumer lock is proven still held (`check_lock`) before anything is deleted."""
    if failed.is_set():
        return  # an earlier batch failed: later ones must not overtake it
    try:
        try:
            refused = commit(d1, schema, p, report, options)
        except IsolationStopped as stop:
            # Finish the messages whose every change is settled (applied or refused), keep the rest queued.
            # Held messages are settled too: they were moved aside, not sent.
            settled = [m for m in p.msgs if m.msg_id in stop.settled]
            poison = [x for x in p.poison + stop.refused if x.msg_id in stop.settled]
            held = p.held
            check_lock()
            _finish(finisher, settled, poison, report, held)
            claimed.release(settled + held)
            report.messages += len(settled)
            failed.set()
            raise stop.error from None
        if p.position:
            report.position = str(p.position[0].params[1])
        if after_d1_commit is not None:
            after_d1_commit([m.msg_id for m in p.msgs])
        poison = p.poison + refused
        check_lock()
        _finish(finisher, p.msgs, poison, report, p.held)
        claimed.release(p.msgs + p.held)
    except BaseException:
        failed.set()
        raise
    report.messages += len(p.msgs) + len(p.held)
    report.batches += 1
    if options.on_batch is not None:
        options.on_batch(report)
    if options.on_batch_messages is not None:
        options.on_batch_messages(report, p.msgs, p.tables)
    log.info(
        "applied batch of %d messages (%d dead-lettered); %d D1 requests so far",
        len(p.msgs),
        len(poison),
        report.requests,
    )


class _Backlog:
    """Where a run that does not follow the queue ends: at the backlog it found. Once a page has completed a
    snapshot taken in the run, a page holding a message past the last one read by then (committed since)
    ends the run, and those wait for the next one; writers as fast as the apply would otherwise keep it
    running for ever. Messages read again (range markers put back for a later batch) and late commits of
    transactions open at that snapshot are still the backlog's. Used by the reader thread only."""

    def __init__(self) -> None:
        self._highest = 0  # the highest msg_id read
        self._end: int | None = None  # the backlog's last msg_id, once a page completed a snapshot

    def past(self, page: Page) -> bool:
        """Whether `page` goes past the backlog (the run ends without it); else it is noted as read."""
        if not page.msgs:
            return False
        last = page.msgs[-1].msg_id  # pages are in msg_id order
        if self._end is not None:
            return last > self._end
        self._highest = max(self._highest, last)
        if page.complete:
            self._end = self._highest
        return False


class _Claimed:
    """The ids this run has read and not yet finished. The reader reads past them; the worker releases a
    batch's ids only after its delete has committed (released earlier, a read could see the rows still there
    and apply a stale copy after newer changes). At most a few batches' ids at a time."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._ids)

    def add(self, msgs: list[QueueMessage]) -> None:
        with self._lock:
            self._ids.update(m.msg_id for m in msgs)

    def release(self, msgs: list[QueueMessage]) -> None:
        with self._lock:
            self._ids.difference_update(m.msg_id for m in msgs)


def _finish(
    pg: PgmqClient,
    msgs: list[QueueMessage],
    poison: list[Poison],
    report: ApplyReport,
    held: list[QueueMessage] = (),  # type: ignore[assignment]
) -> None:
    """Dead-letter the poison, move the held messages to the held queue and delete the whole batch from the
    queue, in one Postgres transaction."""
    msgs = [*msgs, *held]
    with pg.transaction():
        if poison:
            pg.dead_letter([(p.msg_id, p.reason, p.table) for p in poison])
        if held:
            pg.hold([m.msg_id for m in held])
        deleted = pg.finish([m.msg_id for m in msgs])
    if deleted != len(msgs):
        log.warning("%d of %d messages were already gone from the queue", len(msgs) - deleted, len(msgs))
    report.count_dead_letters(poison)
