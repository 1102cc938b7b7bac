"""The message shapes: builders and predicates agree with each other and with the decoders."""

import pytest

from d1sync_dagster.core import messages
from d1sync_dagster.core.changes import Change, Poison, decode_all
from d1sync_dagster.schema import parse_schema

SCHEMA = parse_schema({"t": {"primaryKey": "k", "columns": {"k": "INTEGER", "s": "TEXT"}}})


def test_a_marker_is_a_marker_with_its_rows_and_bounds():
    m = messages.range_marker("t", ["1"], ["9"], 9)
    assert messages.is_backfill(m) and messages.is_marker(m) and not messages.is_chunk(m)
    assert messages.marker_rows(m) == 9 == messages.message_rows(m)
    assert messages.marker_bounds(m) == (["1"], ["9"])
    assert messages.marker_bounds(messages.range_marker("t", None, None, 0)) == (None, None)
    assert messages.marker_rows(messages.range_marker("t", None, None, 0)) == 1  # never weighs nothing


@pytest.mark.parametrize("rng", [{"after": [], "upto": None}, {"after": "1", "upto": None}, "all"])
def test_a_malformed_marker_range_has_no_bounds(rng):
    assert messages.marker_bounds({"type": "BACKFILL", "table": "t", "range": rng}) is None


def test_a_compact_chunk_decodes_to_upserts_of_its_rows():
    c = messages.chunk("t", ["k", "s"], [[1, "a"], [2, "b"]])
    assert messages.is_chunk(c) and not messages.is_marker(c) and messages.message_rows(c) == 2
    assert decode_all(5, c, SCHEMA) == [
        Change(5, "t", "upsert", (1,), {"k": 1, "s": "a"}),
        Change(5, "t", "upsert", (2,), {"k": 2, "s": "b"}),
    ]


def test_a_records_chunk_and_a_delete_message_decode_as_repairs_need():
    c = messages.records_chunk("t", [{"k": 3, "s": "c"}])
    assert not messages.is_chunk(c) and messages.message_rows(c) == 1
    assert decode_all(1, c, SCHEMA) == [Change(1, "t", "upsert", (3,), {"k": 3, "s": "c"})]
    d = messages.delete_message("t", {"k": 3})
    assert messages.message_rows(d) == 1 and not messages.is_backfill(d)
    assert decode_all(2, d, SCHEMA) == [Change(2, "t", "delete", (3,), old={"k": 3})]
    one = messages.delete_message("t", {"k": 3}, shard="s1")
    assert decode_all(3, one, SCHEMA) == [Change(3, "t", "delete", (3,), old={"k": 3}, shard="s1")]


def test_an_unreadable_range_is_poison_with_its_reason():
    m = messages.unreadable_range("t", "range [1] cannot be read: gone")
    assert messages.chunk_error(m) == "range [1] cannot be read: gone" and not messages.is_chunk(m)
    assert decode_all(4, m, SCHEMA) == [Poison(4, "BACKFILL of t: range [1] cannot be read: gone", "t")]


@pytest.mark.parametrize(
    "payload, rows",
    [
        ({"type": "INSERT", "table": "t", "record": {"k": 1}}, 1),
        ("not an object", 1),
        ({"type": "BACKFILL", "table": "t", "rows": 7.9}, 1),
        ({"type": "BACKFILL", "table": "t", "rows": []}, 1),
        ({"type": "BACKFILL", "table": "t", "records": [{}, {}, {}]}, 3),
    ],
)
def test_every_message_weighs_at_least_one_row_change(payload, rows):
    assert messages.message_rows(payload) == rows
