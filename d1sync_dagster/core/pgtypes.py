"""Postgres types and the D1 types of `schema.json`: which D1 type a Postgres type maps to (`init-schema`),
and which Postgres types a D1 type takes without a value that fails to convert (drift, `core/drift.py`).

The mapping is chosen so every value converts exactly by the rules in `core/convert.py`: int2/int4/int8/oid ->
INTEGER; float4/float8 -> REAL; bool -> BOOLEAN; json/jsonb and arrays -> JSON; bytea -> BLOB; text, varchar,
char, name, citext, uuid, enums, numeric (kept exact as text), dates, times, timestamps, interval,
inet/cidr/macaddr, money -> TEXT (as Postgres prints them in JSON). Anything else (geometric types, ranges,
tsvector, xml, bit strings, composite types) has no D1 type.
"""

from __future__ import annotations

_BY_TYPE = {
    "int2": "INTEGER", "int4": "INTEGER", "int8": "INTEGER", "oid": "INTEGER",
    "float4": "REAL", "float8": "REAL",
    "bool": "BOOLEAN",
    "json": "JSON", "jsonb": "JSON",
    "bytea": "BLOB",
    "text": "TEXT", "varchar": "TEXT", "bpchar": "TEXT", "name": "TEXT", "citext": "TEXT", "uuid": "TEXT",
    "numeric": "TEXT", "date": "TEXT", "time": "TEXT", "timetz": "TEXT", "timestamp": "TEXT",
    "timestamptz": "TEXT", "interval": "TEXT", "inet": "TEXT", "cidr": "TEXT", "macaddr": "TEXT",
    "money": "TEXT",
}  # fmt: skip

#: Per D1 type, the Postgres types every value of which converts to it (`core/convert.py`); TEXT and JSON
#: take any value `to_jsonb` renders. An INTEGER column takes dates and timestamps as Unix seconds (the
#: seed's rule); a REAL column takes numeric as the nearest double.
_TAKES: dict[str, frozenset[str] | None] = {
    "INTEGER": frozenset({"int2", "int4", "int8", "oid", "date", "timestamp", "timestamptz"}),
    "REAL": frozenset({"int2", "int4", "int8", "oid", "float4", "float8", "numeric"}),
    "BOOLEAN": frozenset({"bool"}),
    "BLOB": frozenset({"bytea"}),
    "TEXT": None,
    "JSON": None,
}


def d1_type(typname: str, typtype: str, is_array: bool) -> str | None:
    """The D1 type for a Postgres type, or None when it cannot be mapped."""
    if is_array:
        return "JSON"
    if typtype == "e":  # enum
        return "TEXT"
    return _BY_TYPE.get(typname)


def takes(d1: str, typname: str, typtype: str, is_array: bool) -> bool:
    """Whether every value of the Postgres type converts to the D1 type. A type d1sync does not know (a
    domain, an extension's type) is given the benefit of the doubt: its values are held when they fail."""
    allowed = _TAKES.get(d1)
    if allowed is None:
        return True
    if is_array or typtype == "e":
        return False
    if typname not in _BY_TYPE:
        return True
    return typname in allowed
