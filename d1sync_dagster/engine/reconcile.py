"""Reconcile: prove D1 equals Postgres, find the keys that differ, and repair them through the queue.

Comparison is exact, row by row, after the same type conversion apply uses (`engine/compare.py`), in two
passes that never sort either side by a collation the other does not share:

1. D1 in primary-key order, `chunk_size` rows per read through the compact `/raw` form; each chunk's keys
   are looked up in Postgres by key: D1 rows missing from Postgres are *extra*, unequal rows *different*.
2. Only when the counts still disagree: Postgres keys in index order, looked up in D1 by key: *missing*.

The queue is drained first and differing keys are checked once more after another drain, so changes still
in flight are not reported as drift. Repair never writes D1 behind the queue's back: in one short
transaction holding a SHARE lock on the source table (writers wait for it, and it waits for writers in
progress), the current rows of missing/different keys are enqueued as one BACKFILL message and the extra
keys, confirmed absent, as DELETE messages; then the queue is drained. D1 rows read are counted, since
D1 bills them.

A sharded table (`core/shards.py`) is compared shard by shard: a shard's source is the Postgres rows its
rule routes there, so a row found in a shard it does not belong to is *extra* there (a stale copy, or a row
not yet moved after the rule grew), repaired by a DELETE for that shard only while the row's BACKFILL
upsert lands in its own shard. Drift in one shard is repaired in that shard; `shard` limits a run to one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from d1sync_dagster.clients.d1 import D1Client, sharing
from d1sync_dagster.clients.d1_shards import databases_of, rules_of
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core import messages
from d1sync_dagster.core.changes import Key, Row
from d1sync_dagster.core.convert import ConversionError, to_sqlite
from d1sync_dagster.core.plan import sql_literal
from d1sync_dagster.core.shards import ShardRule
from d1sync_dagster.core.statements import MAX_STATEMENT_BYTES
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.catalog import check_reads_every_row, column_types, key_types
from d1sync_dagster.engine.compare import column_groups, diff, pg_rows, read_exact, select_exact
from d1sync_dagster.engine.drift import check as check_drift
from d1sync_dagster.engine.prefetch import read_ahead
from d1sync_dagster.engine.tuning import throughput
from d1sync_dagster.errors import QueueError, ReconcileError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident

log = logging.getLogger(__name__)

#: The share of the D1 API's remaining request budget a comparison spends (the rest stays with the apply).
READ_SHARE = 0.5


@dataclass
class TableDrift:
    source_rows: int = 0
    d1_rows: int = 0
    missing: list[Key] = field(default_factory=list)
    extra: list[Key] = field(default_factory=list)
    different: list[Key] = field(default_factory=list)
    d1_rows_read: int = 0
    repaired: int = 0
    #: Source rows whose values no longer convert to schema.json's types (key -> reason): not compared, never
    #: repaired (D1 keeps what it has), named so the user can fix schema.json.
    unconvertible: dict[Key, str] = field(default_factory=dict)
    #: Why the table could not be compared at all (its source drifted from schema.json), with the fix.
    problems: list[str] = field(default_factory=list)
    #: A sharded table's drift per shard (the fields above are their sums).
    shards: dict[str, TableDrift] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different)

    def add(self, shard: str, part: TableDrift) -> None:
        self.shards[shard] = part
        self.source_rows += part.source_rows
        self.d1_rows += part.d1_rows
        self.missing += part.missing
        self.extra += part.extra
        self.different += part.different
        self.d1_rows_read += part.d1_rows_read
        self.repaired += part.repaired
        self.unconvertible |= part.unconvertible
        self.problems += [p for p in part.problems if p not in self.problems]

    @property
    def in_sync(self) -> bool:
        return self.total == 0 and not self.unconvertible and not self.problems


@dataclass
class ReconcileReport:
    tables: dict[str, TableDrift] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def in_sync(self) -> bool:
        return all(t.in_sync for t in self.tables.values())

    @property
    def d1_rows_read(self) -> int:
        return sum(t.d1_rows_read for t in self.tables.values())

    def to_json(self, *, max_keys: int = 100) -> dict[str, Any]:
        def keys(ks: list[Key]) -> list[list[Any]]:
            return [[v.hex() if isinstance(v, bytes) else v for v in k] for k in ks[:max_keys]]

        return {
            "in_sync": self.in_sync,
            "seconds": round(self.seconds, 2),
            "d1_rows_read": self.d1_rows_read,
            "tables": {
                name: {
                    "source_rows": t.source_rows,
                    "d1_rows": t.d1_rows,
                    "missing": len(t.missing),
                    "extra": len(t.extra),
                    "different": len(t.different),
                    "missing_keys": keys(t.missing),
                    "extra_keys": keys(t.extra),
                    "different_keys": keys(t.different),
                    "d1_rows_read": t.d1_rows_read,
                    "repaired": t.repaired,
                    "unconvertible": [
                        {"key": keys([k])[0], "reason": why} for k, why in list(t.unconvertible.items())[:max_keys]
                    ],
                    "problems": t.problems,
                }
                | (
                    {
                        "shards": {
                            s: {
                                "source_rows": p.source_rows,
                                "d1_rows": p.d1_rows,
                                "missing": len(p.missing),
                                "extra": len(p.extra),
                                "different": len(p.different),
                                "repaired": p.repaired,
                            }
                            for s, p in t.shards.items()
                        }
                    }
                    if t.shards
                    else {}
                )
                for name, t in self.tables.items()
            },
        }


def d1_lookup(d1: D1Client, table: Table, keys: list[Key]) -> tuple[dict[Key, Row], int]:
    """D1 rows for `keys` (statements kept under D1's size limit); returns rows by key and rows read."""
    cols = ", ".join(ident(k) for k in table.key)
    head = f"WHERE ({cols}) IN (VALUES "
    out: dict[Key, Row] = {}
    read = 0
    group: list[str] = []
    # Each read's statement is its select list, the table and this key list: keep the widest under D1's limit.
    room = MAX_STATEMENT_BYTES - 1_000 - max(len(select_exact(table, g).encode()) for g in column_groups(table))
    size = len(head)
    lits = ["(" + ", ".join(sql_literal(v) for v in k) + ")" for k in keys]
    for i, lit in enumerate(lits + [""]):
        if group and (i == len(lits) or size + len(lit.encode()) + 2 > room):
            rows, n = read_exact(d1, table, head + ", ".join(group) + ")")
            out |= rows
            read += n
            group, size = [], len(head)
        if lit:
            group.append(lit)
            size += len(lit.encode()) + 2
    return out, read


def _pg_key_filter(table: Table, types: list[str], keys: list[Key]) -> tuple[str, list[Any]]:
    """WHERE clause matching `keys` (D1 values cast back to the Postgres key types) and its params."""
    cols = ", ".join(ident(k) for k in table.key)
    arrays = ", ".join(f"%s::{t}[]" for t in types)
    params = [[_pg_text(k[i]) for k in keys] for i in range(len(table.key))]
    return f"WHERE ({cols}) IN (SELECT * FROM unnest({arrays}))", params


def _pg_text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    return None if v is None else str(v)


def _pg_lookup(
    pg: PgmqClient, table: Table, types: list[str], keys: list[Key], run: Callable[[str, list[Any]], list[Any]]
) -> list[Any]:
    """`run(where, params)` for `keys` (cast back to the Postgres key types), in a savepoint when a
    transaction is open. A D1 key that does not cast (drift written into D1 by hand: text or a number past
    int64 in an INTEGER key column, say) fails the whole lookup; the keys are then halved until that key is
    found, and it is named in a clear error. Reconcile cannot decide by itself whether such a row is extra
    (a key converted from a type that does not cast back, like a timestamp in an INTEGER column, would look
    the same), so it deletes nothing."""
    where, params = _pg_key_filter(table, types, keys)
    try:
        with pg.transaction():
            return run(where, params)
    except QueueError as e:
        if not (e.sqlstate or "").startswith("22"):
            raise
        if len(keys) > 1:
            mid = len(keys) // 2
            return _pg_lookup(pg, table, types, keys[:mid], run) + _pg_lookup(pg, table, types, keys[mid:], run)
        raise ReconcileError(
            f"D1 table {table.target} holds key {tuple(keys[0])!r}, which Postgres's key types "
            f"({', '.join(types)}) cannot hold ({e}). If that row is drift, delete it in D1 by hand (or nuke and "
            "backfill the table); if the key column replicates a type that does not cast back from its D1 value "
            "(a timestamp key as INTEGER, say), reconcile cannot check this table."
        ) from None


def d1_chunks(d1: D1Client, table: Table, chunk_size: int) -> Any:
    """Yield (rows by key, D1 rows read for them) from D1 in primary-key order."""
    cols = ", ".join(ident(k) for k in table.key)
    last: Key | None = None
    while True:
        where = ""
        if last is not None:
            where = f"WHERE ({cols}) > (" + ", ".join(sql_literal(v) for v in last) + ")"
        chunk, read = read_exact(d1, table, where, limit=chunk_size)
        if not chunk:
            return
        yield chunk, read
        if len(chunk) < chunk_size:
            return
        last = list(chunk)[-1]


@dataclass(frozen=True)
class Scope:
    """What one comparison covers: a whole table in one database, or one shard of a sharded table (the
    Postgres rows its rule routes to `shard`)."""

    shard: str | None = None
    rule: ShardRule | None = None

    def keeps(self, row: Row) -> bool:
        return self.rule is None or self.rule.route(row[self.rule.column]) == self.shard

    def source_rows(self, pg: PgmqClient, table: Table) -> int:
        if self.rule is None:
            return int(pg.execute(f"SELECT count(*) FROM {source_relation(table)}")[0][0])
        col = ident(self.rule.column)
        kind = table.columns[self.rule.column]
        counts = pg.execute(f"SELECT to_jsonb({col}), count(*) FROM {source_relation(table)} GROUP BY 1")
        return sum(
            int(n) for v, n in counts if self.rule.route(None if v is None else to_sqlite(v, kind)) == self.shard
        )


def compare_table(
    pg: PgmqClient,
    d1: D1Client,
    table: Table,
    *,
    chunk_size: int,
    on_chunk: Callable[[str, int], None] | None = None,
    scope: Scope = Scope(),
) -> TableDrift:
    """Pass 1 (D1 chunks against Postgres by key) and, when the counts say rows are missing, pass 2.
    `on_chunk(table, d1_rows_compared_so_far)` is called after every chunk (progress). `d1` is the database
    `scope` covers."""
    drift = TableDrift()
    types = key_types(pg, table)
    all_types = column_types(pg, table)
    for chunk, read in read_ahead(d1_chunks(d1, table, chunk_size), name="d1sync-d1-read"):
        drift.d1_rows += len(chunk)
        drift.d1_rows_read += read
        if on_chunk is not None:
            on_chunk(table.name, drift.d1_rows)
        found = _pg_lookup(
            pg,
            table,
            types,
            list(chunk),
            lambda w, p: list(pg_rows(pg, table, w, p, types=all_types, unconvertible=drift.unconvertible).items()),
        )
        part = diff(
            {k: r for k, r in found if scope.keeps(r)}, {k: r for k, r in chunk.items() if k not in drift.unconvertible}
        )
        drift.extra += part.extra
        drift.different += part.different
    drift.source_rows = scope.source_rows(pg, table)
    if drift.source_rows != drift.d1_rows - len(drift.extra):
        drift.missing = _missing(pg, d1, table, chunk_size, drift, scope)
    return drift


def _missing(pg: PgmqClient, d1: D1Client, table: Table, chunk_size: int, drift: TableDrift, scope: Scope) -> list[Key]:
    """Pass 2: Postgres keys in index order (of `scope`), looked up in D1."""
    keys_sql = ", ".join(ident(k) for k in table.key)
    cols = ", ".join(ident(c) for c in table.columns)
    missing: list[Key] = []
    offset_key: list[Any] | None = None
    types = key_types(pg, table)
    while True:
        where, params = "", []
        if offset_key is not None:
            where = f"WHERE ({keys_sql}) > (" + ", ".join(f"%s::{t}" for t in types) + ")"
            params = offset_key
        rows = pg.execute(
            f"SELECT to_jsonb(r.*), ARRAY[{', '.join(f'r.{ident(k)}::text' for k in table.key)}] FROM "
            f"(SELECT {cols} FROM {source_relation(table)} {where} ORDER BY {keys_sql} LIMIT {int(chunk_size)}) r",
            params,
        )
        if not rows:
            return missing
        keys = []
        for rec, text in rows:
            try:
                if scope.rule is None or scope.keeps({scope.rule.column: _converted(table, scope.rule.column, rec)}):
                    keys.append(tuple(to_sqlite(rec[k], table.columns[k]) for k in table.key))
            except ConversionError as e:
                drift.unconvertible[tuple(text)] = f"the key does not convert: {e}"
        offset_key = list(rows[-1][1])
        if not keys:
            continue
        found, read = d1_lookup(d1, table, keys)
        drift.d1_rows_read += read
        missing += [k for k in keys if k not in found]


def _converted(table: Table, column: str, record: dict[str, Any]) -> Any:
    v = record.get(column)
    return None if v is None else to_sqlite(v, table.columns[column])


def repair(pg: PgmqClient, table: Table, drift: TableDrift, scope: Scope = Scope()) -> int:
    """Enqueue the current state of every differing key; returns messages sent. In a shard, an extra key
    whose row belongs elsewhere is deleted from this shard only, and its row written where it belongs."""
    fix = drift.missing + drift.different + drift.extra
    if not fix:
        return 0
    types = key_types(pg, table)
    with pg.transaction():
        pg.execute(f"LOCK TABLE {source_relation(table)} IN SHARE MODE")
        cols = ", ".join(ident(c) for c in table.columns)
        rows = _pg_lookup(
            pg,
            table,
            types,
            fix,
            lambda w, p: pg.execute(
                f"SELECT to_jsonb(r.*) FROM (SELECT {cols} FROM {source_relation(table)} {w}) r", p
            ),
        )
        records = [r for (r,) in rows]
        rule = scope.rule
        present = {
            tuple(to_sqlite(r[k], table.columns[k]) for k in table.key)
            for r in records
            if rule is None or scope.keeps({rule.column: _converted(table, rule.column, r)})
        }
        out: list[Any] = [messages.records_chunk(table.name, records)] if records else []
        for k in drift.extra:
            if k in present:
                continue
            old = {c: ("\\x" + v.hex() if isinstance(v, bytes) else v) for c, v in zip(table.key, k, strict=True)}
            out.append(messages.delete_message(table.name, old, scope.shard))
        pg.enqueue(out)
    return len(out)


@throughput()  # the interpreter tuning of engine/tuning.py for the whole run
def reconcile(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    *,
    tables: list[str] | None = None,
    chunk_size: int = 5000,
    repair_drift: bool = False,
    apply_options: ApplyOptions | None = None,
    on_chunk: Callable[[str, int], None] | None = None,
    shard: str | None = None,
) -> ReconcileReport:
    """Compare (and with `repair_drift`, repair) `tables` (None: all); `on_chunk` as in `compare_table`.
    A sharded table is compared in each of its shards (with `shard`, in that one only; tables not sharded
    to it are left out)."""
    started = time.monotonic()
    chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
    rules = rules_of(d1)
    if shard is not None:
        chosen = [t for t in chosen if t.name in rules and shard in rules[t.name].shards]
        if not chosen:
            raise ReconcileError(f"no table {'of ' + ', '.join(tables) + ' ' if tables else ''}is sharded to {shard!r}")
    for table in chosen:  # a role under row level security would compare a filtered view and call it in sync
        check_reads_every_row(pg, table, doing="compare")
    options = apply_options or ApplyOptions()
    apply(pg, d1, schema, options)  # changes in flight are not drift
    report = ReconcileReport()
    drifted = check_drift(pg, schema)
    for table in chosen:
        missing = [d.describe() for d in drifted.get(table.name, []) if d.kind != "retyped"]
        if missing:  # its columns cannot even be read: name why, compare the other tables
            report.tables[table.name] = TableDrift(problems=missing)
            log.warning("reconcile %s: not compared: %s", table.name, "; ".join(missing))
            continue
        rule = rules.get(table.name)
        if rule is None:
            drift = _reconcile_in(pg, d1, d1, schema, table, Scope(), chunk_size, repair_drift, options, on_chunk)
        else:
            drift = TableDrift()
            for name, client in databases_of(d1, table.name):
                if shard is not None and name != shard:
                    continue
                scope = Scope(name, rule)
                part = _reconcile_in(pg, d1, client, schema, table, scope, chunk_size, repair_drift, options, on_chunk)
                drift.add(str(name), part)
        report.tables[table.name] = drift
        log.info(
            "reconcile %s: %d rows in Postgres, %d in D1, %d missing, %d extra, %d different%s",
            table.name,
            drift.source_rows,
            drift.d1_rows,
            len(drift.missing),
            len(drift.extra),
            len(drift.different),
            f", {drift.repaired} repair messages" if drift.repaired else "",
        )
    report.seconds = time.monotonic() - started
    return report


def _reconcile_in(
    pg: PgmqClient,
    d1: D1Client,
    database: D1Client,
    schema: Schema,
    table: Table,
    scope: Scope,
    chunk_size: int,
    repair_drift: bool,
    options: ApplyOptions,
    on_chunk: Callable[[str, int], None] | None,
) -> TableDrift:
    """Compare `table` in one database (`scope`), check what differs again after a drain, repair it. The
    comparison reads D1 at most at half the pace the API's budget allows (`READ_SHARE`): the apply that
    shares the token keeps the rest."""
    with sharing([database], READ_SHARE):
        drift = compare_table(pg, database, table, chunk_size=chunk_size, on_chunk=on_chunk, scope=scope)
    if drift.total:
        apply(pg, d1, schema, options)
        drift = _recheck(pg, database, table, drift, scope)
    if drift.total and repair_drift:
        drift.repaired = repair(pg, table, drift, scope)
        apply(pg, d1, schema, options)
    return drift


def _recheck(pg: PgmqClient, d1: D1Client, table: Table, drift: TableDrift, scope: Scope = Scope()) -> TableDrift:
    """Compare only the differing keys again (after a drain): what is still wrong is drift."""
    again = _compare_keys_in(pg, d1, table, drift.missing + drift.extra + drift.different, scope, drift.unconvertible)
    drift.d1_rows_read += again.d1_rows_read
    drift.missing, drift.extra, drift.different = again.missing, again.extra, again.different
    return drift


def compare_keys(pg: PgmqClient, d1: D1Client, table: Table, keys: list[Key]) -> TableDrift:
    """The rows of `keys` compared exactly on both sides (the keys an apply changed: the per-apply check).
    Costs O(keys): Postgres looks them up by its primary key index, D1 reads only those rows (in each shard
    database of a sharded table). `source_rows` and `d1_rows` count the keys found on each side."""
    rule = rules_of(d1).get(table.name)
    if rule is None:
        return _compare_keys_in(pg, d1, table, keys, Scope(), {})
    out = TableDrift()
    for name, client in databases_of(d1, table.name):
        out.add(str(name), _compare_keys_in(pg, client, table, keys, Scope(name, rule), {}))
    return out


def _compare_keys_in(
    pg: PgmqClient, d1: D1Client, table: Table, keys: list[Key], scope: Scope, unconvertible: dict[Key, str]
) -> TableDrift:
    out = TableDrift(unconvertible=unconvertible)
    if not keys:
        return out
    types, all_types = key_types(pg, table), column_types(pg, table)
    looked_up = _pg_lookup(
        pg,
        table,
        types,
        keys,
        lambda w, p: list(pg_rows(pg, table, w, p, types=all_types, unconvertible=unconvertible).items()),
    )
    source = {k: r for k, r in looked_up if scope.keeps(r)}
    found, out.d1_rows_read = d1_lookup(d1, table, keys)
    again = diff(source, {k: r for k, r in found.items() if k not in unconvertible})
    out.missing, out.extra, out.different = again.missing, again.extra, again.different
    out.source_rows, out.d1_rows = len(source), len(found)
    return out
