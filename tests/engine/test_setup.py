"""Schema evolution through setup (both D1 backends): add column, add index, drop column, type change."""

import uuid

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.embedded import pgmq_sql
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.setup import ensure_schema, setup
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import load_schema, parse_schema
from d1sync_dagster.sql.capture import example_source_tables
from tests.conftest import ROOT
from tests.helpers import Pair

BASE = load_schema(ROOT / "schema.json")


def evolve(change) -> object:
    data = BASE.to_json()
    change(data)
    return parse_schema(data)


@pytest.fixture
def synced(source_db, d1):
    with PgmqClient(source_db) as pg:
        setup(pg, d1, BASE)
        pg.execute("INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 2.0 FROM generate_series(1, 300) g")
        apply(pg, d1, BASE)
        yield pg, d1


def indexes(d1, table="apps"):
    (res,) = d1.query(
        f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}' AND name LIKE 'idx%'"
    )
    return sorted(r["name"] for r in res.results)


def test_new_column_is_added_in_place_and_backfilled_for_existing_rows(synced):
    pg, d1 = synced
    pg.execute("ALTER TABLE apps ADD COLUMN category text DEFAULT 'games'")
    grown = evolve(lambda d: d["apps"]["columns"].update(category="TEXT"))
    result = setup(pg, d1, grown)
    assert result.added_columns == ["apps.category TEXT"] and result.backfilled_tables == ["apps"]
    assert result.rebuilt_tables == []
    (res,) = d1.query("SELECT count(*) AS n FROM apps WHERE category = 'games'")
    assert res.results == [{"n": 300}]
    Pair(pg, d1, grown).assert_in_sync()
    assert setup(pg, d1, grown).added_columns == []  # idempotent


def test_new_index_is_created_and_a_removed_one_dropped(synced):
    pg, d1 = synced
    before = indexes(d1)
    more = evolve(lambda d: d["apps"]["indexes"].append("name"))
    result = setup(pg, d1, more)
    assert len(indexes(d1)) == len(before) + 1 and result.backfilled_tables == []
    fewer = evolve(lambda d: d["apps"].update(indexes=["owner_id"]))
    result = setup(pg, d1, fewer)
    assert len(result.dropped_indexes) == 2 and len(indexes(d1)) == 1


def test_removed_column_is_dropped(synced):
    pg, d1 = synced
    smaller = evolve(lambda d: (d["apps"]["columns"].pop("icon"), d["apps"].update(indexes=["owner_id"])))
    result = setup(pg, d1, smaller)
    assert result.dropped_columns == ["apps.icon"]
    (res,) = d1.query("SELECT name FROM pragma_table_info('apps')")
    assert "icon" not in [r["name"] for r in res.results]
    pg.execute("UPDATE apps SET name = 'after drop' WHERE id = 1")
    apply(pg, d1, smaller)
    Pair(pg, d1, smaller).assert_in_sync()


def test_type_change_rebuilds_and_backfills_the_table(synced):
    pg, d1 = synced
    retyped = evolve(lambda d: d["apps"]["columns"].update(rating="TEXT"))
    result = setup(pg, d1, retyped)
    assert result.rebuilt_tables == ["apps"] and result.backfilled_tables == ["apps"]
    (res,) = d1.query("SELECT typeof(rating) AS t, count(*) AS n FROM apps GROUP BY 1")
    assert res.results == [{"t": "text", "n": 300}]
    Pair(pg, d1, retyped).assert_in_sync()


def test_apply_brings_d1_to_a_changed_schema_first(synced):
    pg, d1 = synced
    pg.execute("ALTER TABLE apps ADD COLUMN category text")
    grown = evolve(lambda d: d["apps"]["columns"].update(category="TEXT"))
    pg.execute("UPDATE apps SET category = 'x' WHERE id = 2")
    assert ensure_schema(pg, d1, grown) is not None  # the apply path calls this first
    assert ensure_schema(pg, d1, grown) is None
    apply(pg, d1, grown)
    Pair(pg, d1, grown).assert_in_sync()


@pytest.fixture
def bare_db(pg_admin_url):
    """A database with the example tables and no PGMQ at all."""
    name = f"d1sync_bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(example_source_tables().encode())
    try:
        yield url
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_no_pgmq_and_no_extension_is_refused_unless_the_bundled_sql_is_asked_for(bare_db, d1_local):
    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(bare_db) as pg:
        with pytest.raises(QueueError, match="setup --install-pgmq"):
            setup(pg, d1_local, schema)
        assert pg.pgmq_install() == "missing"  # never installed silently
        setup(pg, d1_local, schema, pgmq_sql=pgmq_sql())
        assert pg.pgmq_install() == "SQL install" and pg.queue_exists()


def test_a_plain_sql_pgmq_older_than_1_5_1_is_named_as_the_reason(bare_db, d1_local):
    """PGMQ 1.4's SQL file makes pgmq.create add its tables to the extension, which does not exist then."""
    with psycopg.connect(bare_db, autocommit=True) as conn:
        conn.execute(
            """CREATE SCHEMA pgmq;
            CREATE TABLE pgmq.meta (queue_name varchar UNIQUE NOT NULL, is_partitioned boolean NOT NULL DEFAULT false,
                                    is_unlogged boolean NOT NULL DEFAULT false, created_at timestamptz DEFAULT now());
            CREATE FUNCTION pgmq.create(queue_name text) RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
              EXECUTE format('CREATE TABLE pgmq.%I (msg_id bigint)', 'q_' || queue_name);
              EXECUTE format('ALTER EXTENSION pgmq ADD TABLE pgmq.%I', 'q_' || queue_name);
            END $$;"""
        )
    with PgmqClient(bare_db) as pg, pytest.raises(QueueError) as e:
        setup(pg, d1_local, load_schema(ROOT / "schema.json"))
    assert "plain-SQL install of PGMQ older than 1.5.1" in str(e.value) and "extension" in str(e.value)
