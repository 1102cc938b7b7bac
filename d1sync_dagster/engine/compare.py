"""Read a table from both sides in the same normalised form and compare row for row.

Postgres rows go through the same conversion as replicated changes (values as `to_jsonb` renders them, or
read natively where that gives the same value, -> the column type's converter), so equal means "what apply
should have produced". D1 values are read exactly: integers as text (JSON numbers over
HTTP would lose digits beyond 2^53), BLOBs as hex, with `typeof` so an integer stored as text is a difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.changes import Key, Row
from d1sync_dagster.core.convert import CONVERTERS, ConversionError, SqlValue
from d1sync_dagster.core.plan import sql_literal
from d1sync_dagster.core.statements import MAX_RESULT_COLUMNS
from d1sync_dagster.engine.ranges import select_list
from d1sync_dagster.errors import ReconcileError
from d1sync_dagster.schema import Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident


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
    unconvertible: dict[Key, str] | None = None,
) -> dict[Key, Row]:
    """The source table's rows (`where` narrows them), converted as apply converts them, by key.

    With the source's column `types` (`ranges.column_types`), columns that can be are read natively, as a
    range read does; without, every value goes through to_jsonb (the reference the tests compare against).
    A row with a value that does not convert (its column was retyped in Postgres) is left out and named in
    `unconvertible` (key -> reason; its raw key text when the key itself does not convert); without
    `unconvertible`, it raises `ReconcileError` naming the table, the key and the reason."""
    rows = pg.execute(f"SELECT {select_list(table, types)} FROM {source_relation(table)} {where}", params or [])
    convert = [(i, c, CONVERTERS[t]) for i, (c, t) in enumerate(table.columns.items())]
    out: dict[Key, Row] = {}
    for values in rows:
        try:
            row = {c: None if (v := values[i]) is None else fn(v) for i, c, fn in convert}
        except ConversionError:
            key, reason = _unconvertible(table, convert, values)
            if unconvertible is None:
                raise ReconcileError(f"{table.name}, key {list(key)}: {reason}") from None
            unconvertible[key] = reason
            continue
        out[tuple([row[k] for k in table.key])] = row
    return out


def _unconvertible(
    table: Table, convert: list[tuple[int, str, Callable[[Any], SqlValue]]], values: Sequence[Any]
) -> tuple[Key, str]:
    """The key of a source row that does not convert (as D1 holds it, else as text) and the reason."""
    at = {c: (i, fn) for i, c, fn in convert}
    try:
        key: Key = tuple(None if values[at[k][0]] is None else at[k][1](values[at[k][0]]) for k in table.key)
    except ConversionError:
        key = tuple(str(values[at[k][0]]) for k in table.key)
    for i, c, fn in convert:
        try:
            if values[i] is not None:
                fn(values[i])
        except ConversionError as e:
            return key, f"column {c!r} does not convert to {table.columns[c]}: {e}"
    return key, "a value does not convert"


class _Torn:
    """A value that changed between the reads of one row's column groups: never equal to anything."""


_TYPEOF = {type(None): "null", int: "integer", float: "real", str: "text", bytes: "blob", _Torn: "torn"}


#: D1 reads at most this many columns per query (`select_exact` splits wider reads into groups).
_RESULT_COLUMNS = MAX_RESULT_COLUMNS


def _exprs(table: Table, column: str) -> list[str]:
    """How one column is read exactly. A REAL column: `typeof` and the value itself (a JSON number is the
    exact double; text as text, BLOB as hex). Any other column: one tagged text, `i<digits>`, `t<text>`,
    `b<hex>` or `r<text>` (a REAL in such a column is drift whatever its digits), NULL as NULL. One result
    column per column where it can be, since D1 returns at most 100."""
    q = ident(column)
    if table.columns[column] == "REAL":
        return [
            f"typeof({q})",
            f"CASE typeof({q}) WHEN 'real' THEN {q} WHEN 'blob' THEN hex({q}) ELSE CAST({q} AS TEXT) END",
        ]
    return [
        f"CASE typeof({q}) WHEN 'integer' THEN 'i' || {q} WHEN 'text' THEN 't' || {q} "
        f"WHEN 'blob' THEN 'b' || hex({q}) WHEN 'real' THEN 'r' || {q} END"
    ]


def column_groups(table: Table) -> list[list[str]]:
    """The table's columns in reads of at most `_RESULT_COLUMNS` result columns, each read starting with
    the key columns (so rows of the reads join by key). One group for any table whose columns fit."""
    width = {c: len(_exprs(table, c)) for c in table.columns}
    budget = _RESULT_COLUMNS - sum(width[k] for k in table.key)
    groups: list[list[str]] = [[]]
    used = 0
    for c in (c for c in table.columns if c not in table.key):
        if used + width[c] > budget and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(c)
        used += width[c]
    return [list(table.key) + g for g in groups]


def select_exact(table: Table, columns: list[str]) -> str:
    """Select list reading `columns` exactly (see `_exprs`)."""
    return ", ".join(e for c in columns for e in _exprs(table, c))


def _decode(table: Table, columns: list[str], rec: list[Any]) -> Row:
    row: Row = {}
    i = 0
    for c in columns:
        if table.columns[c] == "REAL":
            row[c] = typed_value(rec[i], rec[i + 1])
            i += 2
        else:
            v = rec[i]
            row[c] = None if v is None else typed_value(_TAGS[v[0]], v[1:])
            i += 1
    return row


_TAGS = {"i": "integer", "t": "text", "b": "blob", "r": "real"}


def read_exact(d1: D1Client, table: Table, where: str = "", *, limit: int | None = None) -> tuple[dict[Key, Row], int]:
    """Rows of the D1 table matching `where`, read exactly, by key, and the D1 rows read. With `limit`, the
    first `limit` rows in key order. A table wider than one read takes one read per column group: the first
    decides the rows (and, with `limit`, the last key), the others read the same keys; a row that changed in
    between gets a `_Torn` value, so it compares as different and is checked again."""
    keys = ", ".join(ident(k) for k in table.key)
    target = ident(table.target)
    first, *rest = column_groups(table)
    tail = f" ORDER BY {keys} LIMIT {int(limit)}" if limit is not None else ""
    _cols, rows, meta = d1.raw(f"SELECT {select_exact(table, first)} FROM {target} {where}{tail}")
    out: dict[Key, Row] = {}
    for rec in rows:
        row = _decode(table, first, rec)
        out[tuple(row[k] for k in table.key)] = row
    read = int(meta.get("rows_read", len(rows)))  # what D1 bills (its engine's count), where it says
    if rest and out and limit is not None:
        last = "(" + ", ".join(sql_literal(v) for v in list(out)[-1]) + ")"
        where = (f"{where} AND" if where else "WHERE") + f" ({keys}) <= {last}"
    for group in rest if out else []:
        _cols, rows, meta = d1.raw(f"SELECT {select_exact(table, group)} FROM {target} {where}")
        read += int(meta.get("rows_read", len(rows)))
        seen = {}
        for rec in rows:
            row = _decode(table, group, rec)
            seen[tuple(row[k] for k in table.key)] = row
        for key, row in out.items():
            row |= seen.get(key) or {c: _Torn() for c in group if c not in table.key}
    return out, read


def d1_rows(d1: D1Client, table: Table) -> dict[Key, Row]:
    """Every row of the D1 table, read exactly, by key."""
    return read_exact(d1, table)[0]


def typed_value(kind: str, value: Any) -> SqlValue:
    """A D1 value from its `typeof` and its exact rendering (integers as digits, BLOBs as hex, REAL as the
    JSON number itself)."""
    if kind == "null":
        return None
    if kind == "integer":
        return int(value)
    if kind == "real":
        return float(value)
    if kind == "blob":
        return bytes.fromhex(value or "")
    return str(value)


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
