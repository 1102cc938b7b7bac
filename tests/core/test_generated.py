"""The row converter and literal renderer generated per table (`core/changes.py`, `core/plan.py`) give
exactly what the per-value rules give, for any value, errors included."""

from __future__ import annotations

import uuid
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from d1sync_dagster.core.changes import _decoder
from d1sync_dagster.core.convert import CONVERTERS, ConversionError
from d1sync_dagster.core.plan import _LITERALS, _literal_fns
from d1sync_dagster.schema import parse_schema

SCHEMA = parse_schema(
    {
        "t": {
            "primaryKey": "i",
            "columns": {"i": "INTEGER", "s": "TEXT", "r": "REAL", "b": "BOOLEAN", "j": "JSON", "x": "BLOB"},
        }
    }
)
TABLE = SCHEMA.tables[0]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "é",
            "\ud800",
            "t",
            "false",
            "2024-01-02T03:04:05Z",
            "12",
            "\\x00ff",
            "\\xzz",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        ]
    ),
    st.builds(lambda u: str(u).upper(), st.uuids()),
    st.just("a" * 36),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


def reference(record):
    out = {}
    for c, t in TABLE.columns.items():
        v = record[c]
        out[c] = None if v is None else CONVERTERS[t](v)
    return out


def outcome(fn, record):
    try:
        return ("ok", fn(record))
    except ConversionError:
        return ("refused", None)


@settings(max_examples=400)
@given(column=st.sampled_from(list(TABLE.columns)), value=values)
def test_each_column_of_the_generated_row_converter_agrees_with_its_rule(column, value):
    record = dict.fromkeys(TABLE.columns) | {column: value}
    assert outcome(_decoder(TABLE).row, record) == outcome(reference, record)


VALID = {
    "i": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "s": st.one_of(st.text(max_size=40), st.builds(lambda u: str(u).upper(), st.uuids())),
    "r": st.floats(allow_nan=False, allow_infinity=False),
    "b": st.booleans(),
    "j": values,
    "x": st.builds(lambda b: "\\x" + b.hex(), st.binary(max_size=6)),
}


@settings(max_examples=400)
@given(st.fixed_dictionaries({c: st.one_of(VALID[c], values) for c in TABLE.columns}))
def test_the_generated_row_converter_agrees_with_the_rules(record):
    want = outcome(reference, record)
    got = outcome(_decoder(TABLE).row, record)
    assert got == want
    if want[0] == "ok":  # and the same types: 1 and True, 1.0 and 1 are different SQLite values
        assert [type(v) for v in got[1].values()] == [type(v) for v in want[1].values()]


def test_the_fast_cases_and_their_edges():
    row = _decoder(TABLE).row
    base = {"i": 1, "s": "a", "r": 0.5, "b": True, "j": {"b": 1, "a": [True, 1.5]}, "x": None}
    assert row(base) == {"i": 1, "s": "a", "r": 0.5, "b": 1, "j": '{"a":[true,1.5],"b":1}', "x": None}
    u = str(uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")).upper()
    assert row(base | {"s": u})["s"] == u.lower()
    assert (
        row(base | {"i": 2**63 - 1, "b": False, "j": [Decimal("1.10"), 2**70]})["j"] == "[1.1,1180591620717411303424]"
    )
    for bad in ({"i": 2**63}, {"s": "a\x00b"}, {"r": float("inf")}, {"b": 2}, {"x": "zz"}):
        assert outcome(row, base | bad)[0] == "refused"


converted = st.one_of(
    st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.binary(max_size=8),
)  # fmt: skip


@given(st.fixed_dictionaries({c: converted for c in TABLE.columns}))
def test_the_generated_literal_agrees_with_the_rules(row):
    row = {c: (v if TABLE.columns[c] in ("REAL",) or not isinstance(v, float) else None) for c, v in row.items()}
    want_parts = []
    for c, t in TABLE.columns.items():
        v = row[c]
        if t in ("INTEGER", "BOOLEAN") and not (v is None or isinstance(v, int)):
            v = row[c] = None
        if t in ("TEXT", "JSON") and not (v is None or isinstance(v, str)):
            v = row[c] = None
        if t == "BLOB" and not (v is None or isinstance(v, bytes)):
            v = row[c] = None
        if t == "REAL" and not (v is None or isinstance(v, float)):
            v = row[c] = None
        want_parts.append(_LITERALS[t](v))
    assert _literal_fns(tuple(TABLE.columns.items()))(row) == "(" + ",".join(want_parts) + ")"
