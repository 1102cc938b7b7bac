"""Property tests of the pure core: random change histories, coalesced and planned, executed on SQLite,
must leave exactly the rows a naive replay of every change would."""

import math
import sqlite3
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from d1sync_dagster.core.changes import Change
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.plan import PACK_BYTES, plan, real_literal, sql_literal
from d1sync_dagster.core.statements import MAX_BOUND_PARAMS, MAX_STATEMENT_BYTES
from d1sync_dagster.schema import parse_schema
from d1sync_dagster.sql.d1_ddl import schema_ddl

SCHEMA = parse_schema(
    {
        "t": {
            "primaryKey": ["k1", "k2"],
            "columns": {"k1": "INTEGER", "k2": "TEXT", "v": "TEXT", "n": "INTEGER", "r": "REAL", "b": "BLOB"},
            "indexes": ["v"],
        }
    }
)
TABLE = SCHEMA.tables[0]

keys = st.tuples(st.integers(-3, 3), st.sampled_from(["a", "b", "ü"]))
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
rows = st.fixed_dictionaries(
    {
        "v": st.none() | texts,
        "n": st.none() | st.integers(-(2**63), 2**63 - 1),
        "r": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "b": st.none() | st.binary(max_size=8),
    }
)
ops = st.one_of(
    st.tuples(st.just("upsert"), keys, rows, st.none() | keys),
    st.tuples(st.just("delete"), keys, st.none(), st.none()),
    st.tuples(st.just("truncate"), st.none(), st.none(), st.none()),
)


def to_changes(history):
    out = []
    for i, (op, key, values, old_key) in enumerate(history):
        if op == "truncate":
            out.append(Change(i, "t", "truncate"))
        elif op == "delete":
            out.append(Change(i, "t", "delete", key))
        else:
            row = {"k1": key[0], "k2": key[1], **values}
            out.append(Change(i, "t", "upsert", key, row, old_key if old_key != key else None))
    return out


def model(initial, changes):
    state = dict(initial)
    for ch in changes:
        if ch.op == "truncate":
            state.clear()
        elif ch.op == "delete":
            state.pop(ch.key, None)
        else:
            if ch.old_key is not None:
                state.pop(ch.old_key, None)
            state[ch.key] = ch.row
    return state


def run(initial, changes, limit=MAX_STATEMENT_BYTES):
    conn = sqlite3.connect(":memory:")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_BOUND_PARAMS)
    for ddl in schema_ddl(SCHEMA):
        conn.execute(ddl)
    for row in initial.values():
        conn.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)", [row[c] for c in TABLE.columns])
    planned = plan(SCHEMA, coalesce(changes), limit=limit)
    for p in planned:
        assert len(p.statement.sql.encode()) <= limit and len(p.statement.params) <= MAX_BOUND_PARAMS
        conn.execute(p.statement.sql, p.statement.params)
    got = {}
    for rec in conn.execute("SELECT k1, k2, v, n, r, b FROM t"):
        got[(rec[0], rec[1])] = dict(zip(TABLE.columns, rec, strict=True))
    return got, planned


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40), st.lists(st.tuples(keys, rows), max_size=5))
def test_planned_statements_reach_the_state_of_a_naive_replay(history, initial_rows):
    initial = {k: {"k1": k[0], "k2": k[1], **v} for k, v in initial_rows}
    changes = to_changes(history)
    got, _ = run(initial, changes)
    assert got == model(initial, changes)


def with_unchanged(initial, changes):
    """Mark each same-key upsert of an existing row with the columns it left as they were, as decode() does
    for an UPDATE carrying its old_record."""
    state, out = dict(initial), []
    for ch in changes:
        if ch.op == "upsert" and ch.old_key is None and ch.key in state:
            before = state[ch.key]
            same = frozenset(c for c in ch.row if type(before[c]) is type(ch.row[c]) and before[c] == ch.row[c])
            ch = Change(ch.msg_id, ch.table, ch.op, ch.key, ch.row, None, same)
        out.append(ch)
        state = model(state, [ch])
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=40), st.lists(st.tuples(keys, rows), max_size=5))
def test_assigning_only_changed_columns_reaches_the_same_state(history, initial_rows):
    initial = {k: {"k1": k[0], "k2": k[1], **v} for k, v in initial_rows}
    changes = with_unchanged(initial, to_changes(history))
    got, _ = run(initial, changes)
    assert got == model(initial, changes)


@settings(max_examples=50, deadline=None)
@given(st.lists(ops, min_size=1, max_size=40))
def test_small_statement_limit_still_converges(history):
    changes = to_changes(history)
    got, _ = run({}, changes, limit=1200)
    assert got == model({}, changes)


def test_one_row_updated_fifty_times_is_one_statement():
    changes = [
        Change(i, "t", "upsert", (1, "a"), {"k1": 1, "k2": "a", "v": str(i), "n": i, "r": None, "b": None})
        for i in range(50)
    ]
    planned = plan(SCHEMA, coalesce(changes))
    assert [(p.kind, p.rows) for p in planned] == [("upsert", 1)]


def test_thousands_of_rows_pack_into_few_statements():
    changes = [
        Change(i, "t", "upsert", (i, "a"), {"k1": i, "k2": "a", "v": "x" * 20, "n": i, "r": 1.5, "b": None})
        for i in range(5000)
    ]
    planned = plan(SCHEMA, coalesce(changes))
    assert sum(p.rows for p in planned) == 5000
    # ~400 rows per statement of PACK_BYTES (25 KB), against 16 per statement with bound params
    assert len(planned) <= 15
    assert all(len(p.statement.sql) <= PACK_BYTES for p in planned)


def test_a_row_larger_than_the_packing_target_gets_a_literal_statement_of_its_own():
    big = "y" * (PACK_BYTES + 10_000)
    changes = [
        Change(i, "t", "upsert", (i, "a"), {"k1": i, "k2": "a", "v": "x", "n": i, "r": 1.5, "b": None})
        for i in range(3)
    ]
    changes.insert(1, Change(9, "t", "upsert", (9, "a"), {"k1": 9, "k2": "a", "v": big, "n": 9, "r": None, "b": None}))
    planned = plan(SCHEMA, coalesce(changes))
    assert [p.rows for p in planned] == [3, 1]
    assert PACK_BYTES < len(planned[1].statement.sql) <= MAX_STATEMENT_BYTES
    assert planned[1].statement.params == ()  # still one literal row, not the bound-parameter form

    after = {"k1": 1, "k2": "a", "v": "old", "n": 2, "r": None, "b": None}
    unchanged = frozenset({"k1", "k2", "v", "r", "b"})
    (p,) = plan(SCHEMA, coalesce([Change(1, "t", "upsert", (1, "a"), after, None, unchanged)]))
    assert 'SET "n" = excluded."n"' in p.statement.sql and '"v" = excluded' not in p.statement.sql


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_real_literal_is_exact_in_sqlite(f):
    assert sqlite3.connect(":memory:").execute(f"SELECT {real_literal(f)}").fetchone()[0] == f


def test_real_literal_for_random_bit_patterns():
    conn = sqlite3.connect(":memory:")
    import random

    rnd = random.Random(7)
    for _ in range(5000):
        f = struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0]
        if math.isfinite(f):
            assert conn.execute(f"SELECT {real_literal(f)}").fetchone()[0] == f


@given(texts | st.binary(max_size=20) | st.integers(-(2**63), 2**63 - 1) | st.none())
def test_sql_literal_round_trips(value):
    assert sqlite3.connect(":memory:").execute(f"SELECT {sql_literal(value)}").fetchone()[0] == value
