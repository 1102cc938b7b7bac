"""Incremental apply: drain the PGMQ queue into D1, exactly and cheaply.

Per read batch (msg_id order, visibility timeout, under a session advisory lock so two applies never run at
once): decode -> coalesce per key -> plan statements -> one D1 batch request (more only when the body budget
is exceeded) -> then, in one Postgres transaction, dead-letter the poison and delete the batch's messages.

Invariants:
- Nothing is deleted from the queue before it was applied to D1 or copied to the dead-letter queue.
- Messages apply in msg_id order even after a crash: a run first makes visible again any message an
  interrupted run had hidden (its visibility timeout would otherwise let newer batches overtake it).
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from d1sync_dagster.clients.d1 import D1Client, Statement
from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core.changes import Change, Poison, decode_all, message_rows
from d1sync_dagster.core.chunks import decode_chunk
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.plan import Planned, plan, plan_literals, plan_upserts, requests, row_problem
from d1sync_dagster.engine.prefetch import Prefetch
from d1sync_dagster.engine.ranges import RangeReader
from d1sync_dagster.engine.tuning import throughput
from d1sync_dagster.errors import D1Error, QueueError
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import dlq_name
from d1sync_dagster.sql.d1_ddl import upsert_meta
from d1sync_dagster.sql.quoting import ident

log = logging.getLogger(__name__)


@dataclass
class TableStats:
    messages: int = 0
    upserts: int = 0
    deletes: int = 0
    truncates: int = 0
    dead_lettered: int = 0
    statements: int = 0
    rows_written: int = 0
    lag_seconds: float | None = None


@dataclass
class ApplyReport:
    tables: dict[str, TableStats] = field(default_factory=dict)
    messages: int = 0
    batches: int = 0
    requests: int = 0
    statements: int = 0
    rows_written: int = 0
    rows_sent: int = 0
    dead_lettered: int = 0
    duration_seconds: float = 0.0
    drained: bool = False
    skipped: str | None = None
    vacuumed: bool = False

    @property
    def rows_per_request(self) -> float:
        return self.rows_sent / self.requests if self.requests else 0.0

    @property
    def changes_per_second(self) -> float:
        return self.messages / self.duration_seconds if self.duration_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_request"] = round(self.rows_per_request, 1)
        out["changes_per_second"] = round(self.changes_per_second, 1)
        return out


@dataclass(frozen=True)
class ApplyOptions:
    batch_size: int = 2000
    vt_seconds: int = 120
    max_messages: int | None = None
    max_seconds: float | None = None
    request_bytes: int = 2_000_000
    #: Rows per batch when messages carry many rows (backfill chunks); bounds memory.
    max_rows_per_batch: int = 20_000
    #: While this returns True, an empty queue is waited on instead of ending the run (backfill).
    follow: Callable[[], bool] | None = None
    #: Called with the running report after each batch is applied and deleted (progress display).
    on_batch: Callable[[ApplyReport], None] | None = None
    #: After a run that drained the queue, VACUUM the queue table when Postgres counts at least this many
    #: dead rows in it (None: leave it to autovacuum). See `vacuum_queue`.
    vacuum_dead_rows: int | None = 100_000


def lock_name(queue: str) -> str:
    return f"d1sync:apply:{queue}"


@dataclass
class _Prepared:
    """A read batch, decoded and planned, waiting for (or being sent to) D1."""

    msgs: list[QueueMessage]
    poison: list[Poison]
    planned: list[Planned]
    meta: list[Statement]


def apply(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    options: ApplyOptions = ApplyOptions(),
    *,
    after_d1_commit: Callable[[list[int]], None] | None = None,
) -> ApplyReport:
    """Drain the queue (or stop at the message/time budget); returns figures per table.

    Pipelined in three stages: a reader thread reads batches ahead (on this connection, which holds the
    lock), this thread decodes and plans them, and a worker thread sends each to D1 and then deletes its
    messages (on a second connection). D1 requests stay strictly sequential, a batch's messages are deleted
    only after its D1 commit, and once a batch fails no later batch is sent. `after_d1_commit` is called
    with the batch's msg_ids between the D1 commit and the queue delete (tests use it to kill the process
    at the worst moment).
    """
    report = ApplyReport(tables={t.name: TableStats() for t in schema.tables})
    started = time.monotonic()
    with pg.advisory_lock(lock_name(pg.queue)) as got, throughput():
        if not got:
            report.skipped = "another apply is running on this queue"
            log.info("apply skipped: %s", report.skipped)
            return report
        # Under the lock no other consumer runs, so a hidden message was read by one that died mid-batch.
        # Reading past it would apply newer changes before it and then replay it over them: show it again.
        revived = pg.make_visible()
        if revived:
            log.warning("%d messages hidden by an interrupted apply are visible again and apply first", revived)
        deadline = None if options.max_seconds is None else started + options.max_seconds
        failed = threading.Event()
        with pg.clone() as finisher, ThreadPoolExecutor(max_workers=1, thread_name_prefix="d1sync-d1") as pool:
            ranges = RangeReader(pg, schema, max_rows=options.max_rows_per_batch)
            batches = Prefetch(
                lambda qty: ranges.resolve(pg.read(vt=options.vt_seconds, qty=qty)),
                batch_size=options.batch_size,
                max_messages=options.max_messages,
                deadline=deadline,
                weigh=lambda msgs: sum(message_rows(m.message) for m in msgs),
                max_rows=options.max_rows_per_batch,
                follow=options.follow,
            )
            in_flight: deque[Future[None]] = deque()
            try:
                for msgs in batches:
                    prepared = _prepare(schema, msgs, report)
                    in_flight.append(
                        pool.submit(
                            _commit_and_finish, d1, finisher, schema, prepared, report, options, failed, after_d1_commit
                        )
                    )
                    while len(in_flight) > 1:
                        in_flight.popleft().result()
                while in_flight:
                    in_flight.popleft().result()
                report.drained = batches.drained
            finally:
                if in_flight:  # leaving on an error: queued batches must not run after it
                    failed.set()
                for f in in_flight:
                    f.cancel()
                batches.close()
        if report.drained and report.messages and options.vacuum_dead_rows is not None:
            report.vacuumed = vacuum_queue(pg, options.vacuum_dead_rows)
    report.duration_seconds = time.monotonic() - started
    return report


_vacuum_warned: set[str] = set()


def vacuum_queue(pg: PgmqClient, min_dead_rows: int) -> bool:
    """VACUUM the queue table when it holds at least `min_dead_rows` dead rows; True when it ran.

    Every message is inserted, updated by `pgmq.read` and deleted: three row versions for one change. At
    1,000 changes/s autovacuum (which visits a table at most once a minute by default) let the queue table
    grow without bound in the soak benchmark. A plain VACUUM takes no lock writers wait for. Only the
    table's owner may vacuum it (the role that ran the migration); any other role is told once, and the
    table is left to autovacuum."""
    table = f"pgmq.{ident('q_' + pg.queue)}"
    try:
        rows = pg.execute(
            "SELECT s.n_dead_tup, pg_has_role(c.relowner, 'USAGE') FROM pg_stat_user_tables s "
            "JOIN pg_class c ON c.oid = s.relid WHERE s.relid = to_regclass(%s)",
            [table],
        )
        if not rows or rows[0][0] < min_dead_rows:
            return False
        dead, owner = rows[0]
        if not owner:
            _warn_once(table, f"{table} has {dead} dead rows; only its owner can vacuum it, so autovacuum has to")
            return False
        started = time.monotonic()
        pg.execute(f"VACUUM (ANALYZE) {table}")
    except QueueError as e:
        _warn_once(table, f"could not vacuum the queue table {table} (autovacuum will): {e}")
        return False
    log.info("vacuumed %s (%d dead rows) in %.2f s", table, dead, time.monotonic() - started)
    return True


def _warn_once(table: str, message: str) -> None:
    """Vacuum trouble is logged once per queue and process, not after every apply run."""
    if table not in _vacuum_warned:
        _vacuum_warned.add(table)
        log.warning("%s", message)


def _prepare(schema: Schema, msgs: list[QueueMessage], report: ApplyReport) -> _Prepared:
    """Decode, size-check, count and plan one read batch (pure work, no I/O).

    Planned in segments (see `core.chunks`): each compact backfill chunk on its own, the changes between
    two chunks coalesced together; the statements keep message order."""
    poison: list[Poison] = []
    planned: list[Planned] = []
    pending: list[Change] = []
    table_of: dict[int, str | None] = {}
    for m in msgs:
        chunk = decode_chunk(m.msg_id, m.message, schema)
        if chunk is None:
            changes, bad = _decode(schema, [m])
            pending += changes
            poison += bad
            table_of[m.msg_id] = changes[0].table if changes else bad[0].table if bad else None
            continue
        if pending:
            planned += plan(schema, coalesce(pending))
            pending = []
        table_of[m.msg_id] = chunk.table.name
        planned += plan_literals(chunk.table, chunk.literals)
        for ch in chunk.changes:
            problem = row_problem(chunk.table, ch.row or {})
            if problem:
                poison.append(Poison(ch.msg_id, f"{ch.table}: {problem}", ch.table))
            else:
                planned += plan_upserts(chunk.table, [ch.row or {}])
        poison += chunk.poison
    if pending:
        planned += plan(schema, coalesce(pending))

    now = datetime.now(UTC)
    for m in msgs:
        stats = report.tables.get(table_of.get(m.msg_id) or "")
        if stats is not None:
            stats.messages += 1
            stats.lag_seconds = max(stats.lag_seconds or 0.0, (now - m.enqueued_at).total_seconds())
    meta = [
        Statement(upsert_meta(), ("last_applied_at", now.isoformat(timespec="seconds"))),
        Statement(upsert_meta(), ("last_applied_msg_id", str(msgs[-1].msg_id))),
    ]
    return _Prepared(msgs, poison, planned, meta)


def _decode(schema: Schema, msgs: list[QueueMessage]) -> tuple[list[Change], list[Poison]]:
    """Every row change of the messages (the general path), and the ones that cannot apply."""
    changes: list[Change] = []
    poison: list[Poison] = []
    for m in msgs:
        for item in decode_all(m.msg_id, m.message, schema):
            if isinstance(item, Change) and item.row is not None:
                problem = row_problem(schema.table(item.table), item.row)
                if problem:
                    item = Poison(m.msg_id, f"{item.table}: {problem}", item.table)
            if isinstance(item, Change):
                changes.append(item)
            else:
                poison.append(item)
    return changes, poison


def _commit_and_finish(
    d1: D1Client,
    finisher: PgmqClient,
    schema: Schema,
    p: _Prepared,
    report: ApplyReport,
    options: ApplyOptions,
    failed: threading.Event,
    after_d1_commit: Callable[[list[int]], None] | None,
) -> None:
    """D1 commit, then dead-letter and delete (worker thread; batches run one at a time, in order)."""
    if failed.is_set():
        return  # an earlier batch failed: later ones must not overtake it
    try:
        refused = _commit(d1, schema, p, report, options)
        if after_d1_commit is not None:
            after_d1_commit([m.msg_id for m in p.msgs])
        poison = p.poison + refused
        _finish(finisher, p.msgs, poison, report)
    except BaseException:
        failed.set()
        raise
    report.messages += len(p.msgs)
    report.batches += 1
    if options.on_batch is not None:
        options.on_batch(report)
    log.info(
        "applied batch of %d messages (%d dead-lettered); %d D1 requests so far",
        len(p.msgs),
        len(poison),
        report.requests,
    )


def _commit(d1: D1Client, schema: Schema, p: _Prepared, report: ApplyReport, options: ApplyOptions) -> list[Poison]:
    """Send a prepared batch to D1; returns the changes D1 refused, isolated by bisection."""
    if not p.planned:
        return []
    try:
        _send(d1, p.planned, report, options, p.meta)
    except D1Error as e:
        if e.retryable:
            raise
        # Isolate what D1 refuses on the general path: every row change of the batch, in message order.
        changes, _ = _decode(schema, p.msgs)
        mid = len(changes) // 2
        return _apply_changes(d1, schema, changes[:mid], report, options, p.meta) + _apply_changes(
            d1, schema, changes[mid:], report, options, p.meta
        )
    return []


def _apply_changes(
    d1: D1Client,
    schema: Schema,
    changes: list[Change],
    report: ApplyReport,
    options: ApplyOptions,
    meta: list[Statement],
) -> list[Poison]:
    """Apply changes; on a non-retryable D1 error, split in halves to isolate the changes D1 refuses."""
    if not changes:
        return []
    planned = plan(schema, coalesce(changes))
    try:
        _send(d1, planned, report, options, meta)
    except D1Error as e:
        if e.retryable:
            raise
        if len(changes) == 1:
            ch = changes[0]
            log.warning("D1 refused msg %d for %s: %s", ch.msg_id, ch.table, e)
            return [Poison(ch.msg_id, f"D1 refused the change to {ch.table}: {e}", ch.table)]
        mid = len(changes) // 2
        return _apply_changes(d1, schema, changes[:mid], report, options, meta) + _apply_changes(
            d1, schema, changes[mid:], report, options, meta
        )
    return []


def _send(
    d1: D1Client, planned: list[Planned], report: ApplyReport, options: ApplyOptions, meta: list[Statement]
) -> None:
    groups = requests(planned, max_bytes=options.request_bytes)
    for i, group in enumerate(groups):
        stmts = [p.statement for p in group]
        if i == len(groups) - 1:
            stmts += meta  # the bookkeeping rides in the last request: no extra request per batch
        results = d1.batch(stmts)
        report.requests += 1
        for p, res in zip(group, results, strict=False):
            stats = report.tables[p.table]
            stats.statements += 1
            stats.rows_written += res.rows_written
            report.statements += 1
            report.rows_written += res.rows_written
            report.rows_sent += p.rows
            if p.kind == "upsert":
                stats.upserts += p.rows
            elif p.kind == "delete":
                stats.deletes += p.rows
            else:
                stats.truncates += 1


def _finish(pg: PgmqClient, msgs: list[QueueMessage], poison: list[Poison], report: ApplyReport) -> None:
    """Dead-letter the poison and delete the whole batch from the queue, in one Postgres transaction."""
    with pg.conn.transaction():
        if poison:
            pg.dead_letter([(p.msg_id, p.reason, p.table) for p in poison], dlq=dlq_name(pg.queue))
        deleted = pg.delete([m.msg_id for m in msgs])
    if len(deleted) != len(msgs):
        log.warning("%d of %d messages were already gone from the queue", len(msgs) - len(deleted), len(msgs))
    for p in poison:
        report.dead_lettered += 1
        if p.table in report.tables:
            report.tables[p.table].dead_lettered += 1
