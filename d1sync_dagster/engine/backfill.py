"""Backfill: copy existing rows into D1 while writers keep writing, through the ordered queue.

The table is walked in primary-key order in chunks of `chunk_size` keys. Each chunk is one short Postgres
transaction that finds the chunk's upper key (the n-th key after the previous bound, without locks),
enqueues a small range marker into the same queue the triggers write to, and saves the table's progress
(last key, rows, chunks). The apply reads the range's rows when it reaches the marker, in queue order, and
applies them as upserts (`engine/ranges.py` says why that converges where DBLog-style watermarks with plain
reads do not). An earlier version enqueued the rows themselves, read `FOR SHARE`; the same concurrency tests
(four writers, a kill and resume, a writer transaction held open across the chunk read) pass on both, and
the markers make the copy about twice as fast: no row locks, no 500 KB queue messages, no TOAST and WAL
for them.

Progress lives in `d1sync.backfill_progress`, written in the marker's transaction, so an interrupted
backfill resumes after its last enqueued chunk and never enqueues a chunk twice; markers already enqueued
are applied by the next apply whoever runs it. Chunks are bounded by keys, not by LIMIT, so a concurrent key
change cannot make a chunk skip a range. A million rows are 200 small messages at the default chunk size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import rules_of
from d1sync_dagster.clients.pgmq import PgmqClient, describe_holders
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.catalog import check_reads_every_row, key_types
from d1sync_dagster.engine.ranges import enqueue_marker, range_condition
from d1sync_dagster.engine.reports import ApplyReport
from d1sync_dagster.errors import ConfigError, QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import FUNCTION_SCHEMA, source_relation
from d1sync_dagster.sql.quoting import ident

log = logging.getLogger(__name__)

PROGRESS_TABLE = f"{ident(FUNCTION_SCHEMA)}.backfill_progress"


@dataclass
class TableBackfill:
    rows: int = 0
    chunks: int = 0
    seconds: float = 0.0
    resumed_from: list[str] | None = None
    finished: bool = False
    last_marker: int | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class BackfillReport:
    tables: dict[str, TableBackfill] = field(default_factory=dict)
    apply: ApplyReport | None = None
    seconds: float = 0.0
    #: The newest range marker this backfill enqueued.
    last_marker: int | None = None
    #: Who applied the chunks when another consumer held the queue (`describe_holders`), once they landed.
    handed_to: str | None = None

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
            "apply": self._apply_json(),
        }

    def not_landed(self, what: str, seconds: float) -> str | None:
        """Why the chunks are not in D1 yet, when another consumer held the queue and did not apply them within
        `seconds` (`wait_for_consumer_seconds`); None when they landed."""
        if self.apply is None or not self.apply.skipped or self.handed_to is not None:
            return None
        return (
            f"the {what}'s chunks are queued, but the consumer that holds the queue ({self.apply.skipped}) did "
            f"not apply them within {seconds:g}s; they stay queued and land when it gets to them (nothing is lost)"
        )

    def _apply_json(self) -> dict[str, Any] | None:
        """The drain's report; its messages are range markers (one per chunk), so its rate counts the row
        changes they carried (`rows_sent`), not the markers."""
        if self.apply is None:
            return None
        out = self.apply.to_json()
        seconds = self.apply.duration_seconds
        out["changes_per_second"] = round(self.apply.rows_sent / seconds, 1) if seconds else 0.0
        out["markers"] = out.pop("messages")
        return out


def bound_sql(table: Table, types: Sequence[str], *, after: bool) -> str:
    """The key of the chunk's last row (the n-th key after the previous bound), read without locks."""
    keys = ", ".join(ident(k) for k in table.key)
    where = range_condition(table, types, after=after, upto=False)
    last = "ARRAY[" + ", ".join(f"{ident(k)}::text" for k in table.key) + "]"
    return f"SELECT {last} FROM {source_relation(table)} {where} ORDER BY {keys} LIMIT 1 OFFSET %(n)s - 1"


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
    shard: str | None = None,
    wait_for_consumer_seconds: float = 0.0,
) -> BackfillReport:
    """Backfill `tables` (default all), resuming unfinished ones unless `restart`. With `shard`, only that
    shard of sharded tables (every row is read; those of other shards are not written); such a backfill
    always starts from the first key.

    Chunks are produced on a second connection by a background thread while this thread applies the queue
    (following it until the producer is done), so Postgres builds chunk k+1 while D1 takes chunk k. The
    producer stays at most `chunks_ahead` chunks ahead of the apply. When another apply holds the lock (the
    streaming run), the chunks are produced and that apply drains them; with `wait_for_consumer_seconds`
    this waits (that long at most) until it has, so that the caller can record the backfill as landed.
    `on_chunk` is called after each chunk's commit
    (progress reporting; tests use it to interrupt; an exception there stops the backfill and is raised).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
    if shard is not None:
        rules = rules_of(d1)
        chosen = [t for t in chosen if shard in (rules[t.name].shards if t.name in rules else ())]
        if not chosen:
            raise ConfigError(f"no table {'of ' + ', '.join(tables) + ' ' if tables else ''}is sharded to {shard!r}")
        restart = True
    for table in chosen:  # a role under row level security would copy a filtered view
        check_reads_every_row(pg, table, doing="copy")
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
                    stats = report.tables[table.name]
                    _backfill_table(conn, table, stats, chunk_size, throttle, on_chunk, shard)
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
        applied.merge(apply(pg, d1, schema, base))  # what arrived after the follower stopped
    markers = [t.last_marker for t in report.tables.values() if t.last_marker is not None]
    report.last_marker = max(markers) if markers else None
    if applied.skipped and wait_for_consumer_seconds > 0:
        report.handed_to = _wait_until_applied(pg, report.last_marker, wait_for_consumer_seconds)
    report.apply = applied
    report.seconds = time.monotonic() - started
    return report


def _wait_until_applied(pg: PgmqClient, last: int | None, seconds: float) -> str | None:
    """Wait until the consumer holding the queue has applied (deleted) every marker up to `last`; returns
    who it was, or None when it did not within `seconds` (the markers stay queued: nothing is lost)."""
    holders = pg.lock_holders()
    who = describe_holders(holders) if holders else "the next apply"
    if last is None:
        return who
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pg.waiting_upto(last):
            return who
        time.sleep(0.2)
    return None


def _backfill_table(
    pg: PgmqClient,
    table: Table,
    stats: TableBackfill,
    chunk_size: int,
    throttle: tuple[int, threading.Event, threading.Event],
    on_chunk: Callable[[str, TableBackfill], None] | None,
    shard: str | None = None,
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
        n, msg_id, upper = _chunk(pg, table, types, params, last, shard)
        if n:
            pending.append(msg_id)
            stats.last_marker = msg_id
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
    pg: PgmqClient,
    table: Table,
    types: Sequence[str],
    params: dict[str, Any],
    last: list[str] | None,
    shard: str | None = None,
) -> tuple[int, int | None, list[str] | None]:
    """One chunk transaction: bound, marker, progress. Returns (rows, msg_id, upper bound or None at the end)."""
    for attempt in range(5):
        try:
            with pg.transaction():
                bound = pg.execute(bound_sql(table, types, after=last is not None), params)
                upper = list(bound[0][0]) if bound else None
                if upper is not None:
                    n = int(params["n"])
                else:  # the rest of the table, fewer than a chunk
                    where = range_condition(table, types, after=last is not None, upto=False)
                    n = int(pg.execute(f"SELECT count(*) FROM {source_relation(table)} {where}", params)[0][0])
                msg_id = enqueue_marker(pg, table, last, upper, n, shard) if n else None
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
        if pg.contains(oldest):
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
