"""Per-table health figures behind the Dagster asset checks (`defs/checks.py`): row counts on both sides,
what is queued, dead letters."""

from __future__ import annotations

import time
from dataclasses import dataclass

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import databases_of
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.catalog import check_reads_every_row
from d1sync_dagster.engine.drift import check as check_drift
from d1sync_dagster.engine.position import freshness
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident


@dataclass(frozen=True)
class TableHealth:
    source_rows: int
    d1_rows: int
    queued: int
    lag_seconds: float | None
    dead_letters: int
    queued_rows: int = 0  # row changes in the queued messages (a BACKFILL chunk carries many)
    truncate_queued: bool = False
    #: An apply held the queue the whole time the counts were read: D1 may have moved while they were.
    apply_running: bool = False
    #: Why the source count is not the table's (row level security filters what this role sees), or None.
    filtered: str | None = None
    #: A sharded table's D1 rows per shard (`d1_rows` is their sum); None for a table in one database.
    shard_rows: dict[str, int] | None = None
    #: Each drift of the source from schema.json, with its fix (`core/drift.py`).
    drift: tuple[str, ...] = ()
    #: Whether any of it holds the table's changes.
    drift_holds: bool = False
    #: Changes of the table waiting in the held queue.
    held: int = 0
    #: D1's read-your-writes position (`core/txns.py`) and its age in seconds, as D1 recorded them.
    position: str | None = None
    position_age_seconds: float | None = None

    @property
    def count_explained(self) -> bool:
        """Whether the row counts agree once the queued changes are applied, as far as counts can tell: equal,
        or apart by no more than the queued row changes (or a queued TRUNCATE) can account for. Exact when the
        queue holds nothing for the table."""
        if self.filtered:
            return False
        gap = abs(self.source_rows - self.d1_rows)
        return gap == 0 or self.truncate_queued or gap <= self.queued_rows


def table_health(
    pg: PgmqClient, d1: D1Client, schema: Schema, *, wait_for_apply_seconds: float = 30.0, hold_lock: bool = True
) -> dict[str, TableHealth]:
    """Row counts on both sides, queued changes and the age of the oldest, dead letters; per table.

    The source counts and the queue are read in one snapshot, so every source change not yet in D1 is among
    the queued messages counted (the capture trigger enqueues in the writer's transaction). D1 is counted
    while this holds the apply lock, so no apply moves D1 or the queue in between; when an apply holds the
    queue for longer than `wait_for_apply_seconds`, the counts are read anyway and marked `apply_running`.
    With `hold_lock=False` they are read without the lock (a streaming run at its end, whose successor takes
    the lock the moment it is free), marked `apply_running` when another consumer holds it."""
    if not hold_lock:
        return _read_health(pg, d1, schema, apply_running=bool(pg.lock_holders()))
    deadline = time.monotonic() + wait_for_apply_seconds
    while True:
        with pg.consumer_lock() as got:
            if got or time.monotonic() >= deadline:
                return _read_health(pg, d1, schema, apply_running=not got)
        time.sleep(0.2)


def _read_health(pg: PgmqClient, d1: D1Client, schema: Schema, *, apply_running: bool) -> dict[str, TableHealth]:
    with pg.transaction():
        pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        queued = pg.queued_by_table()
        sources = {t.name: int(pg.execute(f"SELECT count(*) FROM {source_relation(t)}")[0][0]) for t in schema.tables}
    letters = pg.dead_letters_by_table()
    drifted = check_drift(pg, schema)
    held = pg.held_by_table()
    fresh = freshness(d1)
    out = {}
    for t in schema.tables:
        try:
            check_reads_every_row(pg, t, doing="count")
            filtered = None
        except QueueError as e:
            filtered = str(e)
        counts = d1_row_counts(d1, t)
        n, rows, truncate, age = queued.get(t.name, (0, 0, False, None))
        out[t.name] = TableHealth(
            sources[t.name],
            sum(counts.values()),
            n,
            age,
            letters.get(t.name, 0),
            rows,
            truncate,
            apply_running,
            filtered,
            {s: c for s, c in counts.items() if s is not None} or None,
            tuple(d.describe() for d in drifted.get(t.name, [])),
            any(d.holds for d in drifted.get(t.name, [])),
            held.get(t.name, 0),
            fresh.position,
            fresh.age_seconds,
        )
    return out


def d1_row_counts(d1: D1Client, table: Table) -> dict[str | None, int]:
    """The table's rows in each database that holds it (None: the target's own; else each shard)."""
    out: dict[str | None, int] = {}
    for shard, client in databases_of(d1, table.name):
        (res,) = client.query(f"SELECT count(*) AS n FROM {ident(table.target)}")
        out[shard] = int(res.results[0]["n"])
    return out
