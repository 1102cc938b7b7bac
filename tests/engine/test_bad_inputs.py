"""Bad inputs, each with a clear error and nothing lost (both D1 backends). Further cases live next to the
code they exercise: schema validation (tests/test_schema.py), poison messages, oversized rows and split
statements (tests/engine/test_apply.py), unreachable services (tests/test_cli.py)."""

import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import SchemaError
from d1sync_dagster.schema import parse_schema
from tests.helpers import Pair

HOSTILE = {
    "order": {
        "primaryKey": ["select", "my key"],
        "columns": {"select": "INTEGER", "my key": "TEXT", "naïve ünïcode": "JSON", "group by": "REAL", "表": "TEXT"},
        "indexes": [["group by", "表"]],
    }
}


def test_hostile_identifiers_work_quoted_end_to_end(pg_url, d1):
    schema = parse_schema(HOSTILE)
    with PgmqClient(pg_url) as pg:
        pg.execute(
            'CREATE TABLE "order" ("select" bigint, "my key" text, "naïve ünïcode" jsonb, "group by" float8, '
            '"表" text, PRIMARY KEY ("select", "my key"))'
        )
        setup(pg, d1, schema)
        pg.execute("INSERT INTO \"order\" VALUES (1, 'a\"b', '{\"x\": 1}', 1.5, '中'), (2, 'c''d', NULL, NULL, NULL)")
        pg.execute('UPDATE "order" SET "my key" = \'moved\' WHERE "select" = 2')
        report = apply(pg, d1, schema)
        assert report.dead_lettered == 0
        Pair(pg, d1, schema).assert_in_sync()


@pytest.mark.parametrize("name", ['a"b', "it's", "nul\x00", "", "x" * 64, "sqlite_master", "_d1sync_meta"])
def test_identifiers_that_cannot_be_quoted_safely_are_refused(name):
    with pytest.raises(SchemaError):
        parse_schema({name: {"primaryKey": "id", "columns": {"id": "INTEGER"}}})


def test_null_primary_key_in_a_message_is_dead_lettered(pair):
    base = {
        "owner_id": None,
        "name": "x",
        "is_public": False,
        "settings": None,
        "rating": None,
        "icon": None,
        "created_at": None,
    }
    pair.pg.send_batch(
        [
            {"type": "INSERT", "table": "apps", "record": {"id": None, **base}, "old_record": None},
            {"type": "DELETE", "table": "apps", "record": None, "old_record": {"id": None}},
            {"type": "UPDATE", "table": "apps", "record": {"id": 5, **base}, "old_record": {}},
        ]
    )
    report = pair.apply()
    reasons = [m["error"] for m in pair.dead_letters()]
    assert report.dead_lettered == 2 and len(reasons) == 2
    assert "NULL primary key" in reasons[0] and "no value for primary key column 'id'" in reasons[1]
    (res,) = pair.d1.query("SELECT id FROM apps")
    assert res.results == [{"id": 5}]


def test_value_that_does_not_fit_its_column_type_is_dead_lettered_with_the_column(pair):
    pair.pg.send_batch(
        [
            {
                "type": "INSERT",
                "table": "apps",
                "record": {
                    "id": 1,
                    "name": "x",
                    "owner_id": None,
                    "is_public": False,
                    "settings": None,
                    "rating": "not a number",
                    "icon": None,
                    "created_at": None,
                },
            }
        ]
    )
    pair.apply()
    (letter,) = pair.dead_letters()
    assert "column 'rating': REAL column got text that is not a number" in letter["error"]
    assert letter["message"]["record"]["rating"] == "not a number"  # the original is kept whole
