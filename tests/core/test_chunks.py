"""The chunk fast path (core.chunks) gives exactly what the general path gives: the same literals, the same
refusals with the same reasons, the same large rows."""

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from d1sync_dagster.core.changes import Change, Poison, decode_all
from d1sync_dagster.core.chunks import decode_chunk
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.plan import PACK_BYTES, plan, plan_literals, row_literal
from d1sync_dagster.schema import parse_schema

SCHEMA = parse_schema(
    {
        "t": {
            "primaryKey": ["k", "s"],
            "columns": {
                "k": "INTEGER",
                "s": "TEXT",
                "r": "REAL",
                "b": "BOOLEAN",
                "j": "JSON",
                "x": "BLOB",
                "n": "INTEGER",
            },
        }
    }
)
TABLE = SCHEMA.table("t")
COLUMNS = ["x", "j", "k", "extra", "s", "r", "b", "n"]  # message order differs from schema order

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c))
# Valid values, values that need conversion, and values that fail it, per column.
anything = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=12)
values = {
    "k": st.integers(min_value=-(2**63), max_value=2**63 - 1) | anything | st.just(Decimal("7")) | st.just(2.5),
    "s": st.text(max_size=20) | anything | st.just("ABCDEF01-2345-6789-ABCD-EF0123456789") | st.just("a\x00b"),
    "r": st.floats() | anything | st.just("1.25") | st.just(Decimal("0.1000000000000000055511151231257827")),
    "b": st.sampled_from([True, False, "t", "f", 1, 0, 2, "maybe", None]),
    "j": json_values | st.just('{"b": 1, "a": [1.0, 2]}') | st.just("[1,"),
    "x": st.sampled_from([None, "\\x00ff", "\\xzz", "plain"]),
    "n": anything,
    "extra": anything,
}
row = st.fixed_dictionaries(values).map(lambda d: [d[c] for c in COLUMNS])
rows = st.lists(row | st.just(None) | st.just([1, 2]), max_size=12)


def general(msg_id, payload):
    """What the general path makes of a chunk: upsert rows and poison."""
    items = decode_all(msg_id, payload, SCHEMA)
    return [i for i in items if isinstance(i, Change)], [i for i in items if isinstance(i, Poison)]


@settings(max_examples=300)
@given(rows)
def test_fast_path_renders_and_refuses_exactly_as_the_general_path(chunk_rows):
    payload = {"type": "BACKFILL", "table": "t", "columns": COLUMNS, "rows": chunk_rows}
    chunk = decode_chunk(7, payload, SCHEMA)
    assert chunk is not None
    changes, poison = general(7, payload)
    assert chunk.poison == poison
    assert chunk.literals + [row_literal(TABLE, c.row) for c in chunk.changes] == [
        row_literal(TABLE, c.row) for c in changes
    ]
    assert chunk.changes == []  # nothing here is too large for a packed statement


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.text(max_size=30)), max_size=40))
def test_tuples_from_a_range_read_decode_like_lists(pairs):
    as_tuples = [(None, {"a": i}, i, 0, s, 1.5, True, i) for i, s in pairs]
    a = decode_chunk(1, {"type": "BACKFILL", "table": "t", "columns": COLUMNS, "rows": as_tuples}, SCHEMA)
    b = decode_chunk(
        1, {"type": "BACKFILL", "table": "t", "columns": COLUMNS, "rows": [list(r) for r in as_tuples]}, SCHEMA
    )
    assert a is not None and b is not None
    assert a == b and len(a.literals) + len(a.poison) == len(pairs)


def test_statements_of_a_chunk_are_those_of_the_general_plan():
    chunk_rows = [[None, {"i": i}, i, 0, f"name {i}'s", i / 7, i % 2 == 0, i * 3] for i in range(2000)]
    payload = {"type": "BACKFILL", "table": "t", "columns": COLUMNS, "rows": chunk_rows}
    chunk = decode_chunk(3, payload, SCHEMA)
    assert chunk is not None
    changes, _ = general(3, payload)
    fast = [p.statement for p in plan_literals(TABLE, chunk.literals)]
    assert fast == [p.statement for p in plan(SCHEMA, coalesce(changes))]
    assert len(fast) > 1 and all(len(s.sql) <= PACK_BYTES for s in fast)


def test_a_row_too_large_for_a_packed_statement_takes_the_general_path():
    big = "y" * 150_000
    payload = {
        "type": "BACKFILL",
        "table": "t",
        "columns": COLUMNS,
        "rows": [[None, None, 1, 0, "a", None, None, None], [None, None, 2, 0, big, None, None, None]],
    }
    chunk = decode_chunk(5, payload, SCHEMA)
    assert chunk is not None
    assert len(chunk.literals) == 1
    assert [c.key for c in chunk.changes] == [(2, big)]


def test_payloads_that_are_not_compact_chunks_are_left_to_the_general_path():
    for payload in [
        {"type": "INSERT", "table": "t", "record": {}},
        {"type": "BACKFILL", "table": "t", "records": []},
        {"type": "BACKFILL", "table": "t", "error": "gone", "columns": [], "rows": []},
        {"type": "BACKFILL", "table": "nope", "columns": COLUMNS, "rows": []},
        {"type": "BACKFILL", "table": "t", "columns": ["k", "s"], "rows": [[1, "a"]]},  # lacks columns
        {"type": "BACKFILL", "table": "t", "range": {"after": None, "upto": None}, "rows": 5},
        [1, 2],
    ]:
        assert decode_chunk(1, payload, SCHEMA) is None
