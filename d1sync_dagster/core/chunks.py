"""Backfill chunks straight to upsert statements: the fast path for the bulk of a backfill.

A compact chunk (`core/messages.py`: rows as arrays under one column list, what a range marker resolves to) holds
distinct keys of one table read in one snapshot, so its rows need nothing of what trigger changes need: no
coalescing per key, no old rows. Each row converts straight to the `(..)` literal that `plan_upserts` would
render from the converted row (same converters, same literal rules), and the literals pack into upserts,
without a `Change` or a dict per row.

A row that does not take the fast path (a conversion error, a NULL key, a malformed row, or a literal too
large for a packed statement) is decoded by `decode_row`, the general path, so every refusal and its reason
are exactly those of `decode_all`.

The apply plans a read batch in segments: the trigger changes between two chunks are coalesced and planned
together, each chunk is planned on its own, and the statements run in message order in one D1 transaction,
which is what applying the messages one by one would leave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from d1sync_dagster.core.changes import Change, Poison, chunk_positions, decode_row
from d1sync_dagster.core.convert import CONVERTERS, INT64_MAX, INT64_MIN, ConversionError
from d1sync_dagster.core.messages import is_chunk
from d1sync_dagster.core.plan import real_literal, sql_literal, upsert_room
from d1sync_dagster.core.shards import ShardRule
from d1sync_dagster.core.statements import MAX_STATEMENT_BYTES

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema, Table

_to_integer, _to_real, _to_text = CONVERTERS["INTEGER"], CONVERTERS["REAL"], CONVERTERS["TEXT"]
_to_boolean, _to_json, _to_blob = CONVERTERS["BOOLEAN"], CONVERTERS["JSON"], CONVERTERS["BLOB"]


class Chunk(NamedTuple):
    """A chunk's rows: `literals` for the packed upserts, `changes` for rows that take the general path
    (too large for a packed statement), `poison` for rows that cannot apply."""

    msg_id: int
    table: Table
    literals: list[str]
    changes: list[Change]
    poison: list[Poison]
    #: With a shard rule: the shard of each literal's row (`core/shards.py`).
    shards: list[str] | None = None


def _integer(v: Any) -> str:
    if v.__class__ is int and INT64_MIN <= v <= INT64_MAX:
        return str(v)
    return "NULL" if v is None else str(_to_integer(v))


def _real(v: Any) -> str:
    return "NULL" if v is None else real_literal(_to_real(v))


def _text(v: Any) -> str:
    return "NULL" if v is None else "'" + _to_text(v).replace("'", "''") + "'"


def _boolean(v: Any) -> str:
    if v is True:
        return "1"
    if v is False:
        return "0"
    return "NULL" if v is None else str(_to_boolean(v))


def _json(v: Any) -> str:
    return "NULL" if v is None else "'" + _to_json(v).replace("'", "''") + "'"


def _blob(v: Any) -> str:
    return "NULL" if v is None else sql_literal(_to_blob(v))


#: Per column type: a decoded JSON value -> the SQLite literal of its converted value ("NULL" for None).
LITERALS: dict[str, Callable[[Any], str]] = {
    "INTEGER": _integer,
    "REAL": _real,
    "TEXT": _text,
    "BOOLEAN": _boolean,
    "JSON": _json,
    "BLOB": _blob,
}


class _Slow(Exception):
    """This row takes the general path."""


def decode_chunk(msg_id: int, payload: Any, schema: Schema, rule: ShardRule | None = None) -> Chunk | None:
    """The chunk's rows as literals, or None when `payload` is not a compact chunk that `decode_all` would
    accept as such (that path then decides, and names what is wrong). With a shard `rule`, each literal's
    shard too."""
    if not is_chunk(payload):
        return None
    table = schema.by_name.get(payload["table"])
    columns, rows = payload["columns"], payload["rows"]
    if table is None or any(c not in columns for c in table.columns):
        return None
    positions = chunk_positions(table, columns)
    width = max(i for i, _, _ in positions) + 1
    at = {c: i for i, c, _ in positions}
    fns = [(at[c], LITERALS[t]) for c, t in table.columns.items()]
    keys = [at[k] for k in table.key]
    room = upsert_room(table, MAX_STATEMENT_BYTES)
    literals: list[str] = []
    changes: list[Change] = []
    poison: list[Poison] = []
    shards: list[str] | None = None
    if rule is not None:
        shards, shard_at, shard_of = [], at[rule.column], CONVERTERS[table.columns[rule.column]]
    for n, values in enumerate(rows):
        try:
            if (values.__class__ is not tuple and values.__class__ is not list) or len(values) < width:
                raise _Slow
            for k in keys:
                if values[k] is None:
                    raise _Slow
            lit = "(" + ",".join([fn(values[i]) for i, fn in fns]) + ")"
            if len(lit) >= room or (not lit.isascii() and len(lit.encode()) >= room):
                raise _Slow
            if shards is not None:
                v = values[shard_at]
                shards.append(rule.route(None if v is None else shard_of(v)))
            literals.append(lit)
        except (_Slow, ConversionError):
            item = decode_row(msg_id, table, n, values, positions, width)
            (changes if isinstance(item, Change) else poison).append(item)
    return Chunk(msg_id, table, literals, changes, poison, shards)
