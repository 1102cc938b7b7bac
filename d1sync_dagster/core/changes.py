"""PGMQ message -> typed `Change`, or `Poison` with the reason it cannot be applied (the general path).

The message shapes themselves are defined in `core/messages.py`. Trigger changes accepted (all
seed-compatible `{"record", "old_record", "type", "table"}`):
- d1sync's own triggers: INSERT/UPDATE with `record` (UPDATE also `old_record`), DELETE with `old_record`,
  TRUNCATE with neither;
- the seed's per-row trigger and its backfill snippet, where `old_record` may be `{}` or null;
- a DELETE that only carries `record` (some webhook formats).
Columns not in `schema.json` are ignored. A record that lacks a replicated column is refused rather than
guessed (a missing column would silently become NULL).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from d1sync_dagster.core import messages
from d1sync_dagster.core.convert import CONVERTERS, ConversionError, SqlValue, to_sqlite
from d1sync_dagster.core.messages import TRIGGER_OPS, Op

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema, Table

Key = tuple[SqlValue, ...]
Row = dict[str, SqlValue]


class Change(NamedTuple):
    """One decoded change (a NamedTuple: cheap to make, and a backfill makes millions).

    `old_key` is set when an UPDATE moved a row to a new key; `unchanged` names the
    columns an UPDATE that kept its key left as they were (when the message carries the old row whole).
    `old` is the message's old row as sent (an UPDATE's or DELETE's `old_record`, unconverted; None when it
    carries none): sharding reads the old shard column from it. `shard` is set for a change meant for one
    shard only (a repair's DELETE, a backfill of one shard)."""

    msg_id: int
    table: str
    op: Op
    key: Key = ()
    row: Row | None = None
    old_key: Key | None = None
    unchanged: frozenset[str] | None = None
    old: dict[str, Any] | None = None
    shard: str | None = None


class Poison(NamedTuple):
    """A message that cannot be applied, and why (no row data in the reason)."""

    msg_id: int
    reason: str
    table: str | None = None


def _key(table: Table, record: dict[str, Any], which: str) -> Key:
    out = []
    for col in table.key:
        if col not in record or record[col] is None:
            raise ConversionError(f"{which} has no value for primary key column {col!r}")
        try:
            out.append(to_sqlite(record[col], table.columns[col]))
        except ConversionError as e:
            raise ConversionError(f"{which} column {col!r}: {e}") from None
    return tuple(out)


@functools.cache
def _converters(columns: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Callable[[Any], SqlValue]], ...]:
    return tuple((c, CONVERTERS[t]) for c, t in columns)


#: Per column type: a Python test that a decoded value `{v}` already is its converted value, so the
#: converter need not be called (the converters' own first checks, inlined; None is handled apart).
_ALREADY = {
    "INTEGER": "{v}.__class__ is int and -9223372036854775808 <= {v} <= 9223372036854775807",
    "TEXT": "{v}.__class__ is str and len({v}) != 36 and {v}.isascii() and '\\x00' not in {v}",
    "REAL": "{v}.__class__ is float and {v} - {v} == 0.0",
}


class _Decoder:
    """What decoding a table's records needs, worked out once per table: its converters and a row
    function generated for its columns (the converters' common cases inlined, one dict built), which
    returns exactly what `{c: convert(record[c])}` would."""

    def __init__(self, table: Table) -> None:
        self.table = table  # kept alive: the cache is keyed by its id
        self.columns = tuple(table.columns)
        self.column_set = frozenset(self.columns)
        self.key = table.key
        self.key0 = table.key[0] if len(table.key) == 1 else None
        self.convert = _converters(tuple(table.columns.items()))
        self.json_columns = frozenset(c for c, t in table.columns.items() if t == "JSON")
        self.scalar_columns = tuple(c for c in self.columns if c not in self.json_columns)
        self.row = self._generate(table)

    @staticmethod
    def _generate(table: Table) -> Callable[[dict[str, Any]], Row]:
        lines = ["def row(r):"]
        env: dict[str, Any] = {"dumps": orjson.dumps, "SORT_KEYS": orjson.OPT_SORT_KEYS}
        for i, (c, t) in enumerate(table.columns.items()):
            v = f"v{i}"
            env[f"c{i}"] = CONVERTERS[t]
            lines.append(f"    {v} = r[{c!r}]")
            if t == "BOOLEAN":
                lines.append(
                    f"    {v} = 1 if {v} is True else 0 if {v} is False else c{i}({v}) if {v} is not None else None"
                )
            elif t == "JSON":  # objects and arrays: canonical_json's fast path, inlined
                lines.append(f"    if {v}.__class__ is dict or {v}.__class__ is list:")
                lines.append("        try:")
                lines.append(f"            {v} = dumps({v}, option=SORT_KEYS).decode()")
                lines.append("        except TypeError:")
                lines.append(f"            {v} = c{i}({v})")
                lines.append(f"    elif {v} is not None:")
                lines.append(f"        {v} = c{i}({v})")
            elif t in _ALREADY:
                lines.append(f"    if {v} is not None and not ({_ALREADY[t].format(v=v)}):")
                lines.append(f"        {v} = c{i}({v})")
            else:
                lines.append(f"    if {v} is not None:")
                lines.append(f"        {v} = c{i}({v})")
        lines.append("    return {" + ", ".join(f"{c!r}: v{i}" for i, c in enumerate(table.columns)) + "}")
        exec("\n".join(lines), env)  # noqa: S102 - names are validated identifiers, quoted by repr
        return env["row"]  # type: ignore[no-any-return]

    def unchanged(self, old: dict[str, Any], new: dict[str, Any]) -> frozenset[str]:
        """Columns equal in both records. Only JSON columns can hold values that compare equal in Python but
        differ as JSON (1, 1.0, true); the other types convert equal values to the same SQLite value."""
        out = [c for c in self.scalar_columns if old[c] == new[c]]
        for c in self.json_columns:
            a, b = old[c], new[c]
            if a == b and _same(a, b):
                out.append(c)
        return frozenset(out)


_DECODERS: dict[int, _Decoder] = {}


def _decoder(table: Table) -> _Decoder:
    d = _DECODERS.get(id(table))
    if d is None or d.table is not table:
        d = _DECODERS[id(table)] = _Decoder(table)
    return d


def _row(table: Table, record: dict[str, Any]) -> Row:
    return _row_of(_decoder(table), record)


def _row_of(d: _Decoder, record: dict[str, Any]) -> Row:
    try:
        return d.row(record)
    except KeyError as e:
        raise ConversionError(f"record lacks replicated column {e.args[0]!r}") from None
    except ConversionError:
        pass
    for c, fn in d.convert:  # slow path, only to name the column that failed
        try:
            if record[c] is not None:
                fn(record[c])
        except ConversionError as e:
            raise ConversionError(f"column {c!r}: {e}") from None
    raise AssertionError("unreachable")


def _same(a: Any, b: Any) -> bool:
    """`same_value`, fast: scalars by type and value, objects and arrays by their sorted orjson text."""
    if a != b or type(a) is not type(b):
        return False
    if not isinstance(a, dict | list):
        return True
    try:
        return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return same_value(a, b)


def same_value(a: Any, b: Any) -> bool:
    """Strict equality of decoded JSON values (Python's == holds 1 == 1.0 == True, JSON does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def decode_all(msg_id: int, payload: Any, schema: Schema) -> list[Change | Poison]:
    """Decode a message into its changes: one for trigger messages, one per row for a BACKFILL chunk, each
    an upsert. A chunk is in the compact form (what a backfill range resolves to) or the record form
    (repairs); both are described in `core/messages.py`."""
    if not messages.is_backfill(payload):
        return [decode(msg_id, payload, schema)]
    name = payload.get("table")
    table = schema.by_name.get(name) if isinstance(name, str) else None
    error = messages.chunk_error(payload)
    if error is not None:  # a backfill range the consumer could not read
        return [Poison(msg_id, f"BACKFILL of {name}: {error}", name if table else None)]
    records, rows, columns = payload.get("records"), payload.get("rows"), payload.get("columns")
    if table is None or not (isinstance(records, list) or (isinstance(rows, list) and isinstance(columns, list))):
        return [Poison(msg_id, "BACKFILL message without a known table and its rows", name if table else None)]
    if isinstance(rows, list) and isinstance(columns, list):
        missing = [c for c in table.columns if c not in columns]
        if missing:
            return [Poison(msg_id, f"BACKFILL of {name}: rows lack replicated column(s) {missing}", name)]
        return _decode_rows(msg_id, table, rows, chunk_positions(table, columns))
    out: list[Change | Poison] = []
    d = _decoder(table)  # once per chunk, not per row
    for i, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ConversionError("record is not an object")
            out.append(_upsert(msg_id, table, _row_of(d, record)))
        except ConversionError as e:
            out.append(Poison(msg_id, f"BACKFILL of {name}, record {i}: {e}", name))
    return out


def _upsert(msg_id: int, table: Table, row: Row) -> Change:
    key = (row[table.key[0]],) if len(table.key) == 1 else tuple([row[c] for c in table.key])
    if None in key:
        raise ConversionError("record has a NULL primary key")
    return Change(msg_id, table.name, "upsert", key, row)


def _decode_rows(
    msg_id: int, table: Table, rows: list[Any], positions: tuple[tuple[int, str, Callable[[Any], SqlValue]], ...]
) -> list[Change | Poison]:
    width = max(i for i, _, _ in positions) + 1
    return [decode_row(msg_id, table, n, values, positions, width) for n, values in enumerate(rows)]


def chunk_positions(table: Table, columns: list[Any]) -> tuple[tuple[int, str, Callable[[Any], SqlValue]], ...]:
    """Where each replicated column sits in a compact chunk's rows (the last of repeated names)."""
    wanted = {c: CONVERTERS[table.columns[c]] for c in table.columns}
    return tuple((i, c, wanted[c]) for i, c in enumerate(columns) if c in wanted)


def decode_row(
    msg_id: int,
    table: Table,
    n: int,
    values: Any,
    positions: tuple[tuple[int, str, Callable[[Any], SqlValue]], ...],
    width: int,
) -> Change | Poison:
    """Row `n` of a compact chunk as an upsert, or the reason it cannot be one."""
    try:
        if not isinstance(values, list | tuple) or len(values) < width:
            raise ConversionError("row is not an array of the listed columns")
        try:
            row = {c: None if (v := values[i]) is None else fn(v) for i, c, fn in positions}
        except ConversionError:
            for i, c, fn in positions:  # slow path, only to name the column that failed
                try:
                    if values[i] is not None:
                        fn(values[i])
                except ConversionError as e:
                    raise ConversionError(f"column {c!r}: {e}") from None
            raise
        return _upsert(msg_id, table, row)
    except ConversionError as e:
        return Poison(msg_id, f"BACKFILL of {table.name}, row {n}: {e}", table.name)


def decode(msg_id: int, payload: Any, schema: Schema) -> Change | Poison:
    """Decode one queue message against the schema."""
    if not isinstance(payload, dict):
        return Poison(msg_id, f"message is a JSON {type(payload).__name__}, expected an object")
    name = payload.get("table")
    if not isinstance(name, str):
        return Poison(msg_id, "message has no 'table' string")
    table = schema.by_name.get(name)
    if table is None:
        return Poison(msg_id, f"table {name[:100]!r} is not in schema.json", name[:100])
    kind = payload.get("type")
    op = TRIGGER_OPS.get(kind) if isinstance(kind, str) else None
    if op is None:
        return Poison(
            msg_id, f"unknown change type {str(kind)[:20]!r} (expected INSERT, UPDATE, DELETE or TRUNCATE)", name
        )
    shard = payload.get("shard")
    if shard is not None and not isinstance(shard, str):
        return Poison(msg_id, "message's 'shard' is not a shard name", name)
    if op == "truncate":
        return Change(msg_id, name, "truncate", shard=shard)
    record, old = payload.get("record"), payload.get("old_record")
    try:
        if op == "delete":
            source = old if isinstance(old, dict) and old else record
            if not isinstance(source, dict) or not source:
                raise ConversionError("DELETE carries neither old_record nor record")
            return Change(msg_id, name, "delete", _key(table, source, "old_record"), old=source, shard=shard)
        if not isinstance(record, dict):
            raise ConversionError(f"{kind} has no 'record' object")
        d = _decoder(table)
        row = _row_of(d, record)
        key = (row[d.key0],) if d.key0 is not None else tuple([row[c] for c in d.key])
        if None in key:
            raise ConversionError("record has a NULL primary key")
        if kind != "UPDATE" or old.__class__ is not dict or not old:
            return Change(msg_id, name, "upsert", key, row, None, None, None, shard)
        old_key, unchanged = None, None
        if d.key0 is not None:
            a, b = old.get(d.key0), record[d.key0]
            known = a is not None
            kept = known and a == b and a.__class__ is b.__class__ and (a.__class__ not in (dict, list) or _same(a, b))
        else:
            known = all(old.get(c) is not None for c in d.key)
            kept = known and all(_same(old[c], record[c]) for c in d.key)
        if kept:
            # Same key: note which columns this UPDATE left as they were (compared as sent, no conversion).
            if d.column_set <= old.keys():
                unchanged = d.unchanged(old, record)
        elif known:
            candidate = _key(table, old, "old_record")
            old_key = candidate if candidate != key else None
        return Change(msg_id, name, "upsert", key, row, old_key, unchanged, old, shard)
    except ConversionError as e:
        return Poison(msg_id, f"{kind} on {name}: {e}", name)
