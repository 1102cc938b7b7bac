"""A source transaction too large for one D1 request, published atomically all the same: staged, then moved
into place by one request. Pure: statements only (`engine/publish.py` sends them).

1. **Prepare** (one request): per table the transaction touches, fresh staging tables in the same database,
   `_d1sync_stage_<target>` (the table's columns and key) for the rows it upserts and
   `_d1sync_unstage_<target>` (the key) for the keys it deletes. Dropped first: a run that died while staging
   leaves nothing that could mix in.
2. **Load** (as many requests as the rows take): the transaction's net changes (coalesced per key, so each key
   is in exactly one of the two tables) as multi-row inserts into them. Readers of the real tables see none
   of it.
3. **Publish** (one request, one D1 transaction): per table, the TRUNCATE when there is one, then
   `DELETE ... WHERE key IN (SELECT key FROM unstage)`, then `INSERT INTO t SELECT ... FROM stage ON CONFLICT
   DO UPDATE` (an unchanged row is not rewritten), then the staging tables are emptied, with the bookkeeping
   and the position riding along (the next staging drops and creates them anew).

The publish request's work grows with the transaction's rows, within D1's 30 s per query
(benchmarks/big_transaction.py measures it). Staging writes each row twice, so it is kept for transactions
that do not fit one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from d1sync_dagster.core.coalesce import TableChanges
from d1sync_dagster.core.plan import Planned, plan_upserts, sorted_keys, upsert_tail
from d1sync_dagster.core.statements import MAX_STATEMENT_BYTES, Statement
from d1sync_dagster.core.tables import PlainTable
from d1sync_dagster.sql.d1_ddl import create_table
from d1sync_dagster.sql.quoting import ident

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema, Table

STAGE_PREFIX, UNSTAGE_PREFIX = "_d1sync_stage_", "_d1sync_unstage_"


@dataclass(frozen=True)
class Staging:
    prepare: list[Statement]
    load: list[Statement]
    #: The statements that make the transaction visible, counted as the table's changes.
    publish: list[Planned]
    #: Emptying the staging tables, in the publish request after `publish`.
    cleanup: list[Statement]


def _stage_tables(table: Table) -> tuple[PlainTable, PlainTable]:
    key = tuple(table.key)
    rows = PlainTable(table.name, STAGE_PREFIX + table.target, key, dict(table.columns))
    keys = PlainTable(table.name, UNSTAGE_PREFIX + table.target, key, {k: table.columns[k] for k in key})
    return rows, keys


def staging(schema: Schema, net: dict[str, TableChanges], *, limit: int = MAX_STATEMENT_BYTES) -> Staging:
    """The statements that stage the net changes `net` and publish them in one request; load statements of
    at most `limit` bytes."""
    prepare: list[Statement] = []
    load: list[Statement] = []
    publish: list[Planned] = []
    cleanup: list[Statement] = []
    for name, tc in net.items():
        table = schema.table(name)
        rows, keys = _stage_tables(table)
        for staged in (rows, keys):
            prepare += [Statement(f"DROP TABLE IF EXISTS {ident(staged.target)}"), Statement(create_table(staged))]
            # Emptied, not dropped, in the publish request: a table that a statement of the same D1 batch reads
            # is not dropped there (the stand-in's D1 engine stalled on it under concurrent reads).
            cleanup.append(Statement(f"DELETE FROM {ident(staged.target)}"))
        upserts = [tc.upserts[k] for k in sorted_keys(tc.upserts)]
        deletes = [dict(zip(table.key, k, strict=True)) for k in sorted_keys(tc.deletes)]
        load += [p.statement for p in plan_upserts(rows, upserts, limit=limit)]  # type: ignore[arg-type]
        load += [p.statement for p in plan_upserts(keys, deletes, limit=limit)]  # type: ignore[arg-type]
        t = ident(table.target)
        key_cols = ", ".join(ident(k) for k in table.key)
        if tc.truncate:
            publish.append(Planned(name, "truncate", 0, Statement(f"DELETE FROM {t}")))
        if deletes:
            where = ident(table.key[0]) if len(table.key) == 1 else f"({key_cols})"
            sql = f"DELETE FROM {t} WHERE {where} IN (SELECT {key_cols} FROM {ident(keys.target)})"
            publish.append(Planned(name, "delete", len(deletes), Statement(sql)))
        if upserts:
            cols = ", ".join(ident(c) for c in table.columns)
            # `WHERE true`: SQLite's parser needs it between a SELECT and an upsert's ON CONFLICT.
            sql = f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {ident(rows.target)} WHERE true" + upsert_tail(table)
            publish.append(Planned(name, "upsert", len(upserts), Statement(sql)))
    return Staging(prepare, load, publish, cleanup)
