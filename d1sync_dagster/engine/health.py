"""Per-table health figures behind the Dagster asset checks (`defs/checks.py`): the rows an apply changed
compared on both sides (or whole row counts), what is queued, dead letters.

Two ways to read them. After an apply or a streaming window, `keys` names the keys the changes touched
(`ChangedKeys`, at most `limit` per table): those rows are compared exactly on both sides, so the check costs
O(changes) in Postgres work and in D1 rows read (D1 bills every row a `count(*)` reads; a 50M-row table
counted every 30 s is 144 billion rows read a day). Without `keys` the tables are counted whole, for the jobs
that already read every row (nuke, the status command); the full comparison is the scheduled reconcile's."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import databases_of
from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core.changes import Change, Key, decode_all
from d1sync_dagster.core.messages import is_backfill
from d1sync_dagster.engine.catalog import check_reads_every_row
from d1sync_dagster.engine.drift import check as check_drift
from d1sync_dagster.engine.position import freshness
from d1sync_dagster.engine.reconcile import TableDrift, compare_keys
from d1sync_dagster.errors import QueueError
from d1sync_dagster.exactjson import loads_exact
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident


@dataclass(frozen=True)
class TableHealth:
    #: Whole-table row counts (None when only the changed keys were compared: see `compared`).
    source_rows: int | None
    d1_rows: int | None
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
    #: The changed keys' comparison (`compare_keys`), when the health was read for `keys`.
    compared: TableDrift | None = None
    #: How many changed keys were compared (at most `ChangedKeys.limit` per table and reading).
    changed_keys: int = 0
    #: What reading this health cost: D1 rows read and Postgres rows read for the row check.
    d1_rows_read: int = 0
    postgres_rows_read: int = 0

    @property
    def mismatches(self) -> int:
        """Rows apart: keys that differ (compared), or the difference of the row counts."""
        if self.compared is not None:
            return self.compared.total
        return abs((self.source_rows or 0) - (self.d1_rows or 0))

    @property
    def count_explained(self) -> bool:
        """Whether D1 agrees with the source once the queued changes are applied, as far as this reading can
        tell: no difference, or no more than the queued row changes (or a queued TRUNCATE) can account for.
        Exact when the queue holds nothing for the table."""
        if self.filtered:
            return False
        gap = self.mismatches
        return gap == 0 or self.truncate_queued or gap <= self.queued_rows


#: While an apply moves D1, differing keys are compared again this many times, this far apart.
RECHECKS, RECHECK_SECONDS = 3, 0.5


@dataclass
class Touched:
    """What changes reached each table since the last take: keys (at most the limit), changes, and when the
    newest of them was committed (enqueued, in the writer's transaction)."""

    keys: dict[str, list[Key]] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    newest: dict[str, datetime] = field(default_factory=dict)


class ChangedKeys:
    """The keys the changes of an apply (or of a streaming window) touched, per table, at most `limit` per
    table: what the per-apply row check compares. Fed by `ApplyOptions.on_batch_messages` from the apply's
    thread, taken from the caller's. Only messages of tables still under the limit are decoded."""

    def __init__(self, schema: Schema, limit: int = 1000) -> None:
        self.schema, self.limit = schema, limit
        self._lock = threading.Lock()
        self._now = Touched()
        self._keys: dict[str, dict[Key, None]] = {}

    def add(self, msgs: list[QueueMessage], tables: dict[int, str | None]) -> None:
        with self._lock:
            now = self._now
            for m in msgs:
                name = tables.get(m.msg_id)
                if name is None:
                    continue
                now.changes[name] = now.changes.get(name, 0) + 1
                if name not in now.newest or m.enqueued_at > now.newest[name]:
                    now.newest[name] = m.enqueued_at
                seen = self._keys.setdefault(name, {})
                if len(seen) >= self.limit:
                    continue
                payload = loads_exact(m.message) if m.message.__class__ is bytes else m.message
                if is_backfill(payload):  # a backfill's rows: its own figures speak for it
                    continue
                for change in decode_all(m.msg_id, payload, self.schema):
                    if change.__class__ is Change and change.key is not None:  # not a TRUNCATE
                        seen[change.key] = None
                        if change.old_key is not None:
                            seen[change.old_key] = None

    def take(self) -> Touched:
        """What arrived since the last take."""
        with self._lock:
            out, self._now = self._now, Touched()
            out.keys = {t: list(k) for t, k in self._keys.items()}  # (each at most `limit` already)
            self._keys = {}
        return out


def table_health(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    *,
    wait_for_apply_seconds: float = 30.0,
    hold_lock: bool = True,
    tables: Iterable[str] | None = None,
    keys: dict[str, list[Key]] | None = None,
) -> dict[str, TableHealth]:
    """Per table of `tables` (None: all): the row check's reading, queued changes and the age of the oldest,
    dead letters, drift. With `keys` (the keys each table's changes touched) the rows of those keys are
    compared; without, both sides are counted whole.

    The source counts and the queue are read in one snapshot, so every source change not yet in D1 is among
    the queued messages counted (the capture trigger enqueues in the writer's transaction); with `keys`, the
    queue is read after the comparison, so a key that changed meanwhile is among the queued changes. D1 is
    read while this holds the apply lock, so no apply moves D1 or the queue in between; when an apply holds
    the queue for longer than `wait_for_apply_seconds`, they are read anyway and marked `apply_running`.
    With `hold_lock=False` they are read without the lock (a streaming run, which holds it itself or whose
    successor takes it the moment it is free), marked `apply_running` when another consumer holds it."""
    chosen = [t for t in schema.tables if tables is None or t.name in set(tables)]
    if not hold_lock:
        return _read_health(pg, d1, chosen, keys, apply_running=bool(pg.lock_holders()), schema=schema)
    deadline = time.monotonic() + wait_for_apply_seconds
    while True:
        with pg.consumer_lock() as got:
            if got or time.monotonic() >= deadline:
                return _read_health(pg, d1, chosen, keys, apply_running=not got, schema=schema)
        time.sleep(0.2)


def _read_health(
    pg: PgmqClient,
    d1: D1Client,
    chosen: list[Table],
    keys: dict[str, list[Key]] | None,
    *,
    apply_running: bool,
    schema: Schema,
) -> dict[str, TableHealth]:
    if not chosen:
        return {}
    filtered: dict[str, str | None] = {}
    for t in chosen:
        try:
            check_reads_every_row(pg, t, doing="count")
            filtered[t.name] = None
        except QueueError as e:
            filtered[t.name] = str(e)
    drifted = check_drift(pg, schema)
    compared: dict[str, TableDrift] = {}
    if keys is not None:
        for t in chosen:  # before the queue is read: a key that changed since is among the queued changes
            readable = not filtered[t.name] and not any(d.kind != "retyped" for d in drifted.get(t.name, []))
            compared[t.name] = compare_keys(pg, d1, t, keys.get(t.name, [])) if readable else TableDrift()
            for _ in range(RECHECKS if apply_running else 0):
                # An apply moves D1 meanwhile (the stream's own): a key may have changed in Postgres and
                # landed in D1 between the two reads. Differences that last are compared once more.
                c = compared[t.name]
                if not c.total:
                    break
                time.sleep(RECHECK_SECONDS)
                again = compare_keys(pg, d1, t, c.missing + c.extra + c.different)
                c.missing, c.extra, c.different = again.missing, again.extra, again.different
                c.d1_rows_read += again.d1_rows_read
    with pg.transaction():
        pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        queued = pg.queued_by_table()
        sources = (
            {t.name: int(pg.execute(f"SELECT count(*) FROM {source_relation(t)}")[0][0]) for t in chosen}
            if keys is None
            else {}
        )
    letters = pg.dead_letters_by_table()
    held = pg.held_by_table()
    fresh = freshness(d1)
    out = {}
    for t in chosen:
        n, rows, truncate, age = queued.get(t.name, (0, 0, False, None))
        found = drifted.get(t.name, [])
        common = dict(
            queued=n,
            lag_seconds=age,
            dead_letters=letters.get(t.name, 0),
            queued_rows=rows,
            truncate_queued=truncate,
            apply_running=apply_running,
            filtered=filtered[t.name],
            drift=tuple(d.describe() for d in found),
            drift_holds=any(d.holds for d in found),
            held=held.get(t.name, 0),
            position=fresh.position,
            position_age_seconds=fresh.age_seconds,
        )
        if keys is None:
            counts = d1_row_counts(d1, t)
            d1_rows = sum(counts.values())
            out[t.name] = TableHealth(
                sources[t.name],
                d1_rows,
                shard_rows={s: c for s, c in counts.items() if s is not None} or None,
                d1_rows_read=d1_rows,  # a count(*) reads (and D1 bills) every row
                postgres_rows_read=sources[t.name],
                **common,  # type: ignore[arg-type]
            )
        else:
            c = compared[t.name]
            out[t.name] = TableHealth(
                None,
                None,
                compared=c,
                changed_keys=len(keys.get(t.name, [])),
                d1_rows_read=c.d1_rows_read,
                postgres_rows_read=c.source_rows,
                **common,  # type: ignore[arg-type]
            )
    return out


def d1_row_counts(d1: D1Client, table: Table) -> dict[str | None, int]:
    """The table's rows in each database that holds it (None: the target's own; else each shard)."""
    out: dict[str | None, int] = {}
    for shard, client in databases_of(d1, table.name):
        (res,) = client.query(f"SELECT count(*) AS n FROM {ident(table.target)}")
        out[shard] = int(res.results[0]["n"])
    return out
