"""Decoding one queue message into a typed change, or poison with the reason."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d1sync_dagster.core.changes import Change, Poison, decode
from d1sync_dagster.schema import parse_schema

SCHEMA = parse_schema(
    {
        "t": {"primaryKey": "k", "columns": {"k": "INTEGER", "s": "TEXT", "j": "JSON"}},
        "c": {"primaryKey": ["a", "b"], "columns": {"a": "INTEGER", "b": "TEXT", "v": "INTEGER"}},
    }
)


def msg(kind, record=None, old=None, table="t"):
    return {"type": kind, "table": table, "record": record, "old_record": old}


def test_insert_is_an_upsert_of_the_converted_row():
    assert decode(1, msg("INSERT", {"k": "7", "s": "x", "j": {"b": 1, "a": 2}, "extra": 1}), SCHEMA) == Change(
        1, "t", "upsert", (7,), {"k": 7, "s": "x", "j": '{"a":2,"b":1}'}
    )


def test_update_with_the_old_row_names_the_columns_it_left_alone():
    old = {"k": 1, "s": "a", "j": [1]}
    ch = decode(2, msg("UPDATE", {"k": 1, "s": "b", "j": [1]}, old), SCHEMA)
    assert ch.op == "upsert" and ch.old_key is None and ch.unchanged == frozenset({"k", "j"})


def test_json_values_equal_in_python_but_not_as_json_count_as_changed():
    ch = decode(2, msg("UPDATE", {"k": 1, "s": "a", "j": 1.0}, {"k": 1, "s": "a", "j": 1}), SCHEMA)
    assert ch.unchanged == frozenset({"k", "s"})


def test_update_that_moves_the_key_carries_the_old_key():
    ch = decode(3, msg("UPDATE", {"a": 1, "b": "y", "v": 0}, {"a": 1, "b": "x", "v": 0}, table="c"), SCHEMA)
    assert ch.key == (1, "y") and ch.old_key == (1, "x") and ch.unchanged is None


def test_seed_shapes_without_an_old_row_are_plain_upserts():
    for old in ({}, None):
        ch = decode(4, msg("UPDATE", {"k": 1, "s": "a", "j": None}, old), SCHEMA)
        assert ch == Change(4, "t", "upsert", (1,), {"k": 1, "s": "a", "j": None})


def test_delete_takes_its_key_from_old_record_or_else_record():
    assert decode(5, msg("DELETE", None, {"k": 9}), SCHEMA) == Change(5, "t", "delete", (9,), old={"k": 9})
    assert decode(6, msg("DELETE", {"k": 8}, {}), SCHEMA) == Change(6, "t", "delete", (8,), old={"k": 8})


def test_truncate_is_a_barrier_change():
    assert decode(7, {"type": "TRUNCATE", "table": "t"}, SCHEMA) == Change(7, "t", "truncate")


@pytest.mark.parametrize(
    "payload, reason, table",
    [
        ([1, 2], "message is a JSON list, expected an object", None),
        ({"type": "INSERT"}, "message has no 'table' string", None),
        ({"type": "INSERT", "table": "nope"}, "table 'nope' is not in schema.json", "nope"),
        ({"type": "MERGE", "table": "t"}, "unknown change type 'MERGE'", "t"),
        (msg("INSERT", {"k": 1, "s": "a"}), "record lacks replicated column 'j'", "t"),
        (msg("INSERT", {"k": None, "s": "a", "j": None}), "NULL primary key", "t"),
        (msg("INSERT", {"k": "x", "s": "a", "j": None}), "column 'k'", "t"),
        (msg("DELETE", None, None), "DELETE carries neither old_record nor record", "t"),
        (msg("UPDATE", None, {"k": 1}), "UPDATE has no 'record' object", "t"),
    ],
)
def test_what_cannot_apply_is_poison_with_a_reason_and_no_row_data(payload, reason, table):
    got = decode(8, payload, SCHEMA)
    assert isinstance(got, Poison) and got.msg_id == 8 and got.table == table
    assert reason in got.reason


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=20).filter(lambda s: "\x00" not in s))
def test_any_valid_row_decodes_with_its_key_taken_from_the_row(k, s):
    ch = decode(9, msg("INSERT", {"k": k, "s": s, "j": None}), SCHEMA)
    assert isinstance(ch, Change) and ch.key == (k,) and ch.row == {"k": k, "s": s, "j": None}
