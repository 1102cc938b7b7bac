"""Read a table from both sides in the same normalised form and compare row for row.

Postgres rows go through the same conversion as replicated changes (values as `to_jsonb` renders them, or
read natively where that gives the same value, -> the column type's converter), so equal means "what apply
should have produced". D1 values are read exactly: integers as text (JSON numbers over
HTTP would lose digits beyond 2^53), BLOBs as hex, with `typeof` so an integer stored as text is a difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.changes import Key, Row
from d1sync_dagster.core.convert import CONVERTERS, SqlValue
from d1sync_dagster.engine.ranges import select_list
from d1sync_dagster.schema import Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident

_TYPEOF = {type(None): "null", int: "integer", float: "real", str: "text", bytes: "blob"}


@dataclass
class Drift:
    missing: list[Key] = field(default_factory=list)  # in Postgres, not in D1
    extra: list[Key] = field(default_factory=list)  # in D1, not in Postgres
    different: list[Key] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different)


def pg_rows(
    pg: PgmqClient,
    table: Table,
    where: str = "",
    params: list[Any] | None = None,
    *,
    types: dict[str, str] | None = None,
) -> dict[Key, Row]:
    """The source table's rows (`where` narrows them), converted as apply converts them, by key.

    With the source's column `types` (`ranges.column_types`), columns that can be are read natively, as a
    range read does; without, every value goes through to_jsonb (the reference the tests compare against)."""
    rows = pg.execute(f"SELECT {select_list(table, types)} FROM {source_relation(table)} {where}", params or [])
    convert = [(i, c, CONVERTERS[t]) for i, (c, t) in enumerate(table.columns.items())]
    out: dict[Key, Row] = {}
    for values in rows:
        row = {c: None if (v := values[i]) is None else fn(v) for i, c, fn in convert}
        out[tuple([row[k] for k in table.key])] = row
    return out


def select_exact(table: Table) -> str:
    """Select list reading every column exactly: `typeof`, exact text (hex for BLOBs), raw value."""
    exprs = []
    for c in table.columns:
        q = ident(c)
        exprs += [f"typeof({q})", f"CASE typeof({q}) WHEN 'blob' THEN hex({q}) ELSE CAST({q} AS TEXT) END", q]
    return ", ".join(exprs)


def rows_from_raw(table: Table, rows: list[list[Any]]) -> dict[Key, Row]:
    """Rows read with `select_exact` through `/raw`, as typed rows by key."""
    out: dict[Key, Row] = {}
    for rec in rows:
        row = {c: typed_value(rec[3 * i], rec[3 * i + 1], rec[3 * i + 2]) for i, c in enumerate(table.columns)}
        out[tuple(row[k] for k in table.key)] = row
    return out


def d1_rows(d1: D1Client, table: Table) -> dict[Key, Row]:
    """Every row of the D1 table, read exactly, by key."""
    _cols, rows, _meta = d1.raw(f"SELECT {select_exact(table)} FROM {ident(table.target)}")
    return rows_from_raw(table, rows)


def typed_value(kind: str, text: str | None, raw: Any) -> SqlValue:
    """A D1 value from its `typeof`, its text (exact for integers, hex for BLOBs) and its raw JSON value."""
    if kind == "null":
        return None
    if kind == "integer":
        return int(text)  # type: ignore[arg-type]
    if kind == "real":
        return float(raw)
    if kind == "blob":
        return bytes.fromhex(text or "")
    return str(raw)


def diff(source: dict[Key, Row], replica: dict[Key, Row]) -> Drift:
    """Keys missing from the replica, extra in it, and rows whose values or storage types differ."""
    drift = Drift()
    for key, row in source.items():
        other = replica.get(key)
        if other is None:
            drift.missing.append(key)
        elif any(_TYPEOF[type(row[c])] != _TYPEOF[type(other[c])] or row[c] != other[c] for c in row):
            drift.different.append(key)
    drift.extra = [k for k in replica if k not in source]
    return drift
