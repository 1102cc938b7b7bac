"""Backfill: copy existing rows into D1 while writers keep writing, through the ordered queue.

Each chunk is one short Postgres transaction that reads up to `chunk_size` rows in primary-key order
`FOR SHARE` and enqueues them as ONE `BACKFILL` message
(`{"type": "BACKFILL", "table", "columns": [names], "rows": [[values], ...]}`)
into the same queue the triggers write to, and saves the table's progress (last key, rows, chunks).

Why this converges: the share locks order every concurrent change of a chunk row around the chunk. A writer
that changed a row first must commit before the chunk can lock it, and its message was inserted before its
commit, so it precedes the chunk in msg_id order and the chunk carries its result. A writer that changes a
row after the chunk read waits for the chunk's commit, so its message follows the chunk. A row inserted
concurrently and not yet committed is invisible to the chunk and arrives through its own message; a chunk
only upserts the rows it read, never deletes. (Plain reads would not do: a msg_id is taken at insert, not
at commit, so a writer committing just after the read could precede the chunk with an older row.)

Progress lives in `d1sync.backfill_progress`, written in the chunk's transaction, so an interrupted
backfill resumes after its last committed chunk and never enqueues a chunk twice. Chunks are bounded by
keys (the n-th key after the previous bound, found without locks), not by LIMIT, so a concurrent key change
cannot make a chunk skip a range. One message per chunk keeps the queue small: a million rows are 200
messages at the default chunk size.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, ApplyReport, apply
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import FUNCTION_SCHEMA, source_relation
from d1sync_dagster.sql.quoting import ident, literal

log = logging.getLogger(__name__)

PROGRESS_TABLE = f"{ident(FUNCTION_SCHEMA)}.backfill_progress"


@dataclass
class TableBackfill:
    rows: int = 0
    chunks: int = 0
    seconds: float = 0.0
    resumed_from: list[str] | None = None
    finished: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class BackfillReport:
    tables: dict[str, TableBackfill] = field(default_factory=dict)
    apply: ApplyReport | None = None
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def to_json(self) -> dict[str, Any]:
        out = {name: asdict(t) | {"rows_per_second": round(t.rows_per_second)} for name, t in self.tables.items()}
        return {
            "tables": out,
            "rows": self.rows,
            "seconds": round(self.seconds, 2),
            "rows_per_second": round(self.rows / self.seconds) if self.seconds else 0,
            "apply": self.apply.to_json() if self.apply else None,
        }


def key_types(pg: PgmqClient, table: Table) -> list[str]:
    """The Postgres types of the key columns, to cast saved key text back exactly."""
    rows = pg.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        [source_relation(table)],
    )
    types = dict(rows)
    missing = [k for k in table.key if k not in types]
    if missing:
        raise QueueError(f"{source_relation(table)} has no column(s) {', '.join(missing)} named as key in schema.json")
    return [types[k] for k in table.key]


def bound_sql(table: Table, types: Sequence[str], *, after: bool) -> str:
    """The key of the chunk's last row (the n-th key after the previous bound), read without locks."""
    keys = ", ".join(ident(k) for k in table.key)
    where = ""
    if after:
        where = f"WHERE ({keys}) > (" + ", ".join(f"%(k{i})s::{t}" for i, t in enumerate(types)) + ")"
    last = "ARRAY[" + ", ".join(f"{ident(k)}::text" for k in table.key) + "]"
    return f"SELECT {last} FROM {source_relation(table)} {where} ORDER BY {keys} LIMIT 1 OFFSET %(n)s - 1"


def chunk_sql(table: Table, queue: str, types: Sequence[str], *, after: bool, upto: bool) -> str:
    """One chunk: the rows in (previous bound, bound], FOR SHARE, enqueued as one BACKFILL message; returns
    (rows, msg_id).

    The range is fixed by key bounds rather than by LIMIT: a row whose key a concurrent writer changes is
    re-checked by Postgres after the lock wait and must still lie in the range, so a chunk can never carry
    a far-away new key and make the next chunk skip the keys in between. (The writer's own messages, ordered
    before the chunk, carry the moved row.)
    """
    cols = ", ".join(ident(c) for c in table.columns)
    keys = ", ".join(ident(k) for k in table.key)
    conds = []
    if after:
        conds.append(f"({keys}) > (" + ", ".join(f"%(k{i})s::{t}" for i, t in enumerate(types)) + ")")
    if upto:
        conds.append(f"({keys}) <= (" + ", ".join(f"%(u{i})s::{t}" for i, t in enumerate(types)) + ")")
    where = ("WHERE " + " AND ".join(conds)) if conds else ""
    # Rows travel as arrays under one list of column names: half the size of one object per row, and
    # twice as fast for Postgres to build (measured here: 0.46 s against 0.93 s for 100,000 rows).
    names = literal(json.dumps(list(table.columns)))
    row = ", ".join(ident(c) for c in table.columns)
    return f"""
WITH chunk AS (
  SELECT {cols} FROM {source_relation(table)} {where} ORDER BY {keys} FOR SHARE
), sent AS (
  INSERT INTO pgmq.{ident("q_" + queue)} (vt, message)
  SELECT now(), jsonb_build_object('type', 'BACKFILL', 'table', {literal(table.name)}, 'record', NULL,
                                   'old_record', NULL, 'columns', {names}::jsonb,
                                   'rows', jsonb_agg(jsonb_build_array({row})))
  FROM chunk HAVING count(*) > 0
  RETURNING msg_id
)
SELECT (SELECT count(*) FROM chunk), (SELECT msg_id FROM sent)"""


def _progress(pg: PgmqClient, table: Table) -> tuple[list[str] | None, int, int, bool] | None:
    rows = pg.execute(
        f"SELECT last_key, rows, chunks, finished_at IS NOT NULL FROM {PROGRESS_TABLE} "
        "WHERE queue = %s AND table_name = %s",
        [pg.queue, table.name],
    )
    return tuple(rows[0]) if rows else None  # type: ignore[return-value]


def reset_progress(pg: PgmqClient, tables: Sequence[Table]) -> None:
    pg.execute(
        f"DELETE FROM {PROGRESS_TABLE} WHERE queue = %s AND table_name = ANY(%s)", [pg.queue, [t.name for t in tables]]
    )


def backfill(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    *,
    tables: Sequence[str] | None = None,
    chunk_size: int = 5000,
    restart: bool = False,
    chunks_ahead: int = 32,
    apply_options: ApplyOptions | None = None,
    on_chunk: Callable[[str, TableBackfill], None] | None = None,
) -> BackfillReport:
    """Backfill `tables` (default all), resuming unfinished ones unless `restart`.

    Chunks are produced on a second connection by a background thread while this thread applies the queue
    (following it until the producer is done), so Postgres builds chunk k+1 while D1 takes chunk k. The
    producer stays at most `chunks_ahead` chunks ahead of the apply. When another apply holds the lock, the
    chunks are produced and that apply drains them. `on_chunk` is called after each chunk's commit
    (progress reporting; tests use it to interrupt; an exception there stops the backfill and is raised).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
    if restart:
        reset_progress(pg, chosen)
    report = BackfillReport(tables={t.name: TableBackfill() for t in chosen})
    started = time.monotonic()
    done, unthrottled, stop = threading.Event(), threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with pg.clone() as conn:
                for table in chosen:
                    throttle = (chunks_ahead, unthrottled, stop)
                    _backfill_table(conn, table, report.tables[table.name], chunk_size, throttle, on_chunk)
        except BaseException as e:  # raised in the calling thread below
            failure.append(e)
        finally:
            done.set()

    producer = threading.Thread(target=produce, name="d1sync-backfill", daemon=True)
    producer.start()
    base = apply_options or ApplyOptions()
    following = replace(base, follow=lambda: not done.is_set())
    try:
        applied = apply(pg, d1, schema, following)
    except BaseException:
        stop.set()  # the apply failed: stop producing, keep what is committed
        raise
    finally:
        unthrottled.set()  # nobody follows the queue any more (or another apply does): do not wait on it
        done.wait()
        producer.join()
    if failure:
        raise failure[0]
    if not applied.skipped:
        _merge(applied, apply(pg, d1, schema, base))  # what arrived after the follower stopped
    report.apply = applied
    report.seconds = time.monotonic() - started
    return report


def _backfill_table(
    pg: PgmqClient,
    table: Table,
    stats: TableBackfill,
    chunk_size: int,
    throttle: tuple[int, threading.Event, threading.Event],
    on_chunk: Callable[[str, TableBackfill], None] | None,
) -> None:
    ahead, unthrottled, stop = throttle
    types = key_types(pg, table)
    state = _progress(pg, table)
    last: list[str] | None = None
    if state and not state[3]:
        last, stats.resumed_from = state[0], state[0]
        log.info("backfill of %s resumes after key %s (%d rows in %d chunks before)", table.name, last, *state[1:3])
    elif state:
        reset_progress(pg, [table])
    t0 = time.monotonic()
    pending: deque[int] = deque()
    while not stop.is_set():
        _wait_for_room(pg, pending, ahead, unthrottled)
        params: dict[str, Any] = {"n": chunk_size}
        if last is not None:
            params |= {f"k{i}": v for i, v in enumerate(last)}
        n, msg_id, upper = _chunk(pg, table, types, params, last)
        if n:
            pending.append(msg_id)
            stats.rows += n
            stats.chunks += 1
            stats.seconds = time.monotonic() - t0
            if on_chunk is not None:
                on_chunk(table.name, stats)
        if upper is None:
            stats.finished = True
            break
        last = upper
    stats.seconds = time.monotonic() - t0
    log.info(
        "backfill of %s: %d rows in %d chunks, %.0f rows/s", table.name, stats.rows, stats.chunks, stats.rows_per_second
    )


def _chunk(
    pg: PgmqClient, table: Table, types: Sequence[str], params: dict[str, Any], last: list[str] | None
) -> tuple[int, int | None, list[str] | None]:
    """One chunk transaction; run again when Postgres picks it as a deadlock victim (its share locks can meet
    a writer's row locks taken in another order)."""
    for attempt in range(5):
        try:
            with pg.conn.transaction():
                bound = pg.execute(bound_sql(table, types, after=last is not None), params)
                upper = list(bound[0][0]) if bound else None
                if upper is not None:
                    params |= {f"u{i}": v for i, v in enumerate(upper)}
                sql = chunk_sql(table, pg.queue, types, after=last is not None, upto=upper is not None)
                n, msg_id = pg.execute(sql, params)[0]
                # Without an upper bound this chunk took every remaining row: the table is done.
                _save(pg, table, upper if upper is not None else last, n, finished=upper is None)
            return n, msg_id, upper
        except QueueError as e:
            if not e.transient or attempt == 4:
                raise
            log.warning("backfill chunk of %s: %s; running it again", table.name, e)
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _wait_for_room(pg: PgmqClient, pending: deque[int], ahead: int, unthrottled: threading.Event) -> None:
    """Block while `ahead` of our chunks are still in the queue (the apply has not taken them yet)."""
    while len(pending) >= ahead and not unthrottled.is_set():
        oldest = pending[0]
        if pg.execute(f"SELECT EXISTS (SELECT 1 FROM pgmq.{ident('q_' + pg.queue)} WHERE msg_id = %s)", [oldest])[0][0]:
            time.sleep(0.02)
        else:
            pending.popleft()


def _save(pg: PgmqClient, table: Table, last: list[str] | None, n: int, *, finished: bool) -> None:
    pg.execute(
        f"""INSERT INTO {PROGRESS_TABLE} AS p (queue, table_name, last_key, rows, chunks, started_at, updated_at,
                                               finished_at)
            VALUES (%(q)s, %(t)s, %(last)s, %(n)s, %(c)s, now(), now(), CASE WHEN %(fin)s THEN now() END)
            ON CONFLICT (queue, table_name) DO UPDATE SET last_key = excluded.last_key,
              rows = p.rows + excluded.rows, chunks = p.chunks + excluded.chunks, updated_at = now(),
              finished_at = excluded.finished_at""",
        {"q": pg.queue, "t": table.name, "last": last, "n": n, "c": 1 if n else 0, "fin": finished},
    )


def _merge(total: ApplyReport, part: ApplyReport) -> None:
    """Add one apply run's figures to the running total."""
    for name, s in part.tables.items():
        t = total.tables.setdefault(name, type(s)())
        for f in ("messages", "upserts", "deletes", "truncates", "dead_lettered", "statements", "rows_written"):
            setattr(t, f, getattr(t, f) + getattr(s, f))
        t.lag_seconds = max(t.lag_seconds or 0.0, s.lag_seconds or 0.0) if s.lag_seconds is not None else t.lag_seconds
    for f in ("messages", "batches", "requests", "statements", "rows_written", "rows_sent", "dead_lettered"):
        setattr(total, f, getattr(total, f) + getattr(part, f))
    total.duration_seconds += part.duration_seconds
    total.drained = part.drained
    total.skipped = part.skipped
