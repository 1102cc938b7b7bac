"""Backfill: copy existing rows into D1 while writers keep writing, through the ordered queue.

Each chunk is one short Postgres transaction that reads up to `chunk_size` rows in primary-key order
`FOR SHARE` and enqueues them as ONE `BACKFILL` message (`{"type": "BACKFILL", "table", "records": [...]}`)
into the same queue the triggers write to, and saves the table's progress (last key, rows, chunks).

Why this converges: the share locks order every concurrent change of a chunk row around the chunk. A writer
that changed a row first must commit before the chunk can lock it, and its message was inserted before its
commit, so it precedes the chunk in msg_id order and the chunk carries its result. A writer that changes a
row after the chunk read waits for the chunk's commit, so its message follows the chunk. A row inserted
concurrently and not yet committed is invisible to the chunk and arrives through its own message; a chunk
only upserts the rows it read, never deletes. (Plain reads would not do: a msg_id is taken at insert, not
at commit, so a writer committing just after the read could precede the chunk with an older row.)

Progress lives in `d1sync.backfill_progress`, written in the chunk's transaction, so an interrupted
backfill resumes after its last committed chunk and never enqueues a chunk twice. One message per chunk
keeps the queue small: a million rows are 200 messages at the default chunk size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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


def chunk_sql(table: Table, queue: str, types: Sequence[str], *, after: bool) -> str:
    """One chunk: rows after the last key, FOR SHARE, enqueued as one BACKFILL message; returns
    (rows, last key as text[], msg_id)."""
    cols = ", ".join(ident(c) for c in table.columns)
    keys = ", ".join(ident(k) for k in table.key)
    where = ""
    if after:
        bounds = ", ".join(f"%(k{i})s::{t}" for i, t in enumerate(types))
        where = f"WHERE ({keys}) > ({bounds})"
    last = "ARRAY[" + ", ".join(f"{ident(k)}::text" for k in table.key) + "]"
    descending = ", ".join(f"{ident(k)} DESC" for k in table.key)
    return f"""
WITH chunk AS (
  SELECT {cols} FROM {source_relation(table)} {where} ORDER BY {keys} LIMIT %(n)s FOR SHARE
), sent AS (
  INSERT INTO pgmq.{ident("q_" + queue)} (vt, message)
  SELECT now(), jsonb_build_object('type', 'BACKFILL', 'table', {literal(table.name)}, 'record', NULL,
                                   'old_record', NULL, 'records', jsonb_agg(to_jsonb(chunk)))
  FROM chunk HAVING count(*) > 0
  RETURNING msg_id
)
SELECT (SELECT count(*) FROM chunk), (SELECT {last} FROM chunk ORDER BY {descending} LIMIT 1),
       (SELECT msg_id FROM sent)"""


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
    apply_every: int = 10,
    apply_options: ApplyOptions | None = None,
    on_chunk: Callable[[str, TableBackfill], None] | None = None,
) -> BackfillReport:
    """Backfill `tables` (default all), resuming unfinished ones unless `restart`.

    Every `apply_every` chunks (and at the end) the queue is drained into D1, so the backlog stays small;
    when another apply holds the lock, that apply drains it instead. `on_chunk` is called after each chunk's
    commit (progress reporting; tests use it to interrupt).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
    if restart:
        reset_progress(pg, chosen)
    report = BackfillReport()
    started = time.monotonic()
    options = apply_options or ApplyOptions()
    applied = ApplyReport()
    for table in chosen:
        stats = report.tables[table.name] = TableBackfill()
        types = key_types(pg, table)
        state = _progress(pg, table)
        last: list[str] | None = None
        if state and not state[3]:
            last, stats.resumed_from = state[0], state[0]
            log.info(
                "backfill of %s resumes after key %s (%d rows in %d chunks before)",
                table.name,
                last,
                state[1],
                state[2],
            )
        elif state:
            reset_progress(pg, [table])
        t0 = time.monotonic()
        while True:
            params: dict[str, Any] = {"n": chunk_size}
            if last is not None:
                params |= {f"k{i}": v for i, v in enumerate(last)}
            with pg.conn.transaction():
                n, new_last, _msg = pg.execute(chunk_sql(table, pg.queue, types, after=last is not None), params)[0]
                _save(pg, table, new_last if n else last, n, finished=n == 0)
            if n == 0:
                stats.finished = True
                break
            last = list(new_last)
            stats.rows += n
            stats.chunks += 1
            stats.seconds = time.monotonic() - t0
            if on_chunk is not None:
                on_chunk(table.name, stats)
            if stats.chunks % apply_every == 0:
                _merge(applied, apply(pg, d1, schema, options))
        stats.seconds = time.monotonic() - t0
        log.info(
            "backfill of %s: %d rows in %d chunks, %.0f rows/s",
            table.name,
            stats.rows,
            stats.chunks,
            stats.rows_per_second,
        )
    _merge(applied, apply(pg, d1, schema, options))
    report.apply = applied
    report.seconds = time.monotonic() - started
    return report


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
