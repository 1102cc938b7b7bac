"""setup: new columns and indexes in schema.json reach existing D1 tables (both D1 backends)."""

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema, parse_schema
from tests.conftest import ROOT


def test_new_column_and_index_are_added_in_place_and_replicate(source_db, d1):
    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(source_db) as pg:
        setup(pg, d1, schema)
        pg.execute("ALTER TABLE apps ADD COLUMN category text")
        grown = schema.to_json()
        grown["apps"]["columns"]["category"] = "TEXT"
        grown["apps"]["indexes"].append("category")
        schema2 = parse_schema(grown)
        result = setup(pg, d1, schema2)
        assert result.added_columns == ["apps.category TEXT"] and result.extra_columns == []
        again = setup(pg, d1, schema2)
        assert again.added_columns == []
        (res,) = d1.query("SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%category%'")
        assert len(res.results) == 1
        pg.execute("INSERT INTO apps (id, name, category) VALUES (1, 'x', 'games')")
        from d1sync_dagster.engine.apply import apply

        apply(pg, d1, schema2)
        (res,) = d1.query("SELECT category FROM apps")
        assert res.results == [{"category": "games"}]
        # Dropping it from schema.json leaves the D1 column in place and says so.
        assert setup(pg, d1, schema).extra_columns == ["apps.category"]
