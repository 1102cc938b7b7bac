"""Nuke and reconcile against real Postgres + PGMQ and both D1 backends."""

import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.compare import column_groups
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import ConfigError, ReconcileError, SchemaError
from d1sync_dagster.schema import parse_schema
from tests.helpers import Pair


def filled(pair):
    pair.sql("INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 4.0 FROM generate_series(1, 400) g")
    pair.sql("INSERT INTO app_versions (app_id, version) SELECT g % 9, 'v' || g FROM generate_series(1, 90) g")
    pair.apply()
    return pair


def count(pair, table):
    (res,) = pair.d1.query(f'SELECT count(*) AS n FROM "{table}"')
    return res.results[0]["n"]


def test_nuke_refuses_without_confirmation(pair):
    filled(pair)
    with pytest.raises(ConfigError, match="confirm"):
        nuke(pair.pg, pair.d1, pair.schema)
    assert count(pair, "apps") == 400


def test_nuke_unknown_table_is_a_clear_error_and_drops_nothing(pair):
    filled(pair)
    with pytest.raises(SchemaError, match="'nope' is not in schema.json"):
        nuke(pair.pg, pair.d1, pair.schema, tables=["nope"], confirm=True)
    assert count(pair, "apps") == 400


def test_nuke_all_recreates_empty_tables_then_backfill_refills(pair):
    filled(pair)
    pair.sql("UPDATE apps SET name = 'queued' WHERE id < 5")  # still queued at nuke time
    report = nuke(pair.pg, pair.d1, pair.schema, confirm=True)
    assert report.tables == ["apps", "app_versions"] and report.purged_messages == 0
    assert report.bookmark  # a restore point was taken first
    if report.bookmark.startswith("file:"):  # the local backend's restore point is a full copy
        import sqlite3

        with sqlite3.connect(report.bookmark.removeprefix("file:")) as backup:
            assert backup.execute("SELECT count(*) FROM apps").fetchone()[0] == 400
    assert count(pair, "apps") == 0 and count(pair, "app_versions") == 0
    assert pair.queue_depth() == 4  # not purged
    backfill(pair.pg, pair.d1, pair.schema)
    pair.assert_in_sync()


def test_nuke_one_table_with_queue_purge(pair):
    filled(pair)
    pair.sql("UPDATE apps SET name = 'queued' WHERE id < 5")
    pair.sql("UPDATE app_versions SET downloads = 7 WHERE app_id = 1")
    pair.pg.send_batch([{"type": "INSERT", "table": "apps", "record": {"id": "bad"}}])
    pair.apply()  # one dead letter for apps
    pair.sql("UPDATE apps SET name = 'queued again' WHERE id < 5")
    report = nuke(pair.pg, pair.d1, pair.schema, tables=["apps"], purge_queue=True, confirm=True)
    assert report.purged_messages == 4 and report.purged_dead_letters == 1
    assert count(pair, "apps") == 0 and count(pair, "app_versions") == 90
    assert pair.queue_depth() == 0
    # The other table's state is untouched; indexes are back.
    (res,) = pair.d1.query("SELECT count(*) AS n FROM sqlite_master WHERE type = 'index' AND tbl_name = 'apps'")
    assert res.results == [{"n": 2}]


def test_clean_tables_report_zero_drift(pair):
    filled(pair)
    report = reconcile(pair.pg, pair.d1, pair.schema, chunk_size=150)
    assert report.in_sync
    assert report.tables["apps"].d1_rows == 400 and report.tables["apps"].source_rows == 400
    assert report.d1_rows_read == 490


def test_drift_is_found_with_the_right_keys_and_repaired(pair):
    filled(pair)
    pair.sql("INSERT INTO apps (id, name) VALUES (9007199254740993, 'big')")
    pair.apply()
    # Drift written straight into D1, behind the pipeline's back:
    pair.d1.query("DELETE FROM apps WHERE id = 17")  # deleted row
    pair.d1.query("INSERT INTO apps (id, name) VALUES (5000, 'ghost')")  # extra row
    pair.d1.query("UPDATE apps SET name = 'tampered' WHERE id = 42")  # changed value
    pair.d1.query("UPDATE apps SET id = 9007199254740992 WHERE id = 9007199254740993")  # changed bigint key
    pair.d1.query("UPDATE app_versions SET downloads = 99 WHERE app_id = 3 AND version = 'v3'")
    report = reconcile(pair.pg, pair.d1, pair.schema, chunk_size=100)
    apps = report.tables["apps"]
    assert sorted(apps.missing) == [(17,), (9007199254740993,)]
    assert sorted(apps.extra) == [(5000,), (9007199254740992,)]
    assert apps.different == [(42,)]
    assert report.tables["app_versions"].different == [(3, "v3")]
    assert not report.in_sync

    fixed = reconcile(pair.pg, pair.d1, pair.schema, chunk_size=100, repair_drift=True)
    assert fixed.tables["apps"].repaired > 0
    pair.assert_in_sync()
    assert reconcile(pair.pg, pair.d1, pair.schema).in_sync


def test_changes_in_flight_are_not_reported_as_drift(pair):
    filled(pair)
    pair.sql("UPDATE apps SET name = 'in flight' WHERE id <= 30")  # queued, not applied yet
    report = reconcile(pair.pg, pair.d1, pair.schema)
    assert report.in_sync


@pytest.mark.parametrize("bad", ["'not a number'", "99999999999999999999"])  # text; a REAL past int64
def test_a_d1_key_postgres_cannot_hold_is_a_clear_error_and_nothing_is_deleted(pair, bad):
    """Drift written into D1 by hand that no Postgres row can have: in D1's INTEGER key column of
    app_versions (a single INTEGER key is SQLite's rowid and refuses both). Reconcile names the key and
    stops; it does not guess that the row is extra, and repair deletes nothing."""
    filled(pair)
    pair.d1.query(f"INSERT INTO app_versions (app_id, version) VALUES ({bad}, 'v1')")
    before = count(pair, "app_versions")
    for repair_drift in (False, True):
        with pytest.raises(ReconcileError, match=r"D1 table app_versions holds key \(.*'v1'\), which Postgres's key"):
            reconcile(pair.pg, pair.d1, pair.schema, chunk_size=100, repair_drift=repair_drift)
    assert count(pair, "app_versions") == before and pair.queue_depth() == 0
    pair.d1.query(f"DELETE FROM app_versions WHERE app_id = {bad}")  # what the error says to do
    assert reconcile(pair.pg, pair.d1, pair.schema, chunk_size=100).in_sync


def wide_schema(real_columns: int) -> dict:
    """A 100-column table (the most schema.json allows): a key, `real_columns` REAL columns, the rest a mix."""
    others = ["INTEGER", "TEXT", "JSON", "BOOLEAN", "BLOB"]
    columns = {"id": "INTEGER"} | {f"r{i}": "REAL" for i in range(real_columns)}
    columns |= {f"c{i}": others[i % len(others)] for i in range(99 - real_columns)}
    return {"wide": {"primaryKey": "id", "columns": columns}}


PG_TYPES = {
    "INTEGER": "bigint",
    "TEXT": "text",
    "JSON": "jsonb",
    "BOOLEAN": "boolean",
    "BLOB": "bytea",
    "REAL": "float8",
}


@pytest.mark.parametrize("real_columns", [0, 60])
def test_verify_and_repair_a_100_column_table(pg_url, d1, real_columns):
    """D1 returns at most 100 columns per query: a 100-column table is read in one query when its columns
    fit, and in column groups when REAL columns (two result columns each) make it wider."""
    spec = wide_schema(real_columns)
    schema = parse_schema(spec)
    table = schema.table("wide")
    assert len(column_groups(table)) == (1 if real_columns == 0 else 2)
    with PgmqClient(pg_url) as pg:
        cols = ", ".join(f"{c} {PG_TYPES[t]}" for c, t in table.columns.items())
        pg.execute(f"CREATE TABLE wide ({cols}, PRIMARY KEY (id))")
        setup(pg, d1, schema)
        values = {
            "INTEGER": "g * 7",
            "TEXT": "'t' || g",
            "JSON": "jsonb_build_object('g', g)",
            "BOOLEAN": "g % 2 = 0",
            "BLOB": "decode(lpad(to_hex(g), 4, '0'), 'hex')",
            "REAL": "g / 3.0",
        }
        select = ", ".join("g" if c == "id" else values[t] for c, t in table.columns.items())
        pg.execute(f"INSERT INTO wide SELECT {select} FROM generate_series(1, 300) g")
        apply(pg, d1, schema)
        report = reconcile(pg, d1, schema, chunk_size=120)
        assert report.tables["wide"].total == 0 and report.tables["wide"].d1_rows == 300
        last = list(table.columns)[-1]
        d1.query(f'UPDATE wide SET "{last}" = NULL WHERE id = 250')  # drift in the last column group
        d1.query("UPDATE wide SET c0 = 999 WHERE id = 5")
        d1.query("DELETE FROM wide WHERE id = 77")
        drift = reconcile(pg, d1, schema, chunk_size=120, repair_drift=True).tables["wide"]
        assert sorted(drift.different) == [(5,), (250,)] and drift.missing == [(77,)]
        assert reconcile(pg, d1, schema, chunk_size=120).tables["wide"].total == 0
        Pair(pg, d1, schema).assert_in_sync()


def test_verify_and_repair_a_table_with_columns_named_like_the_queries_aliases(pg_url, d1):
    """The compare and repair queries call the row `r`: a table with a column `r` had that column's value
    read as the whole row."""
    schema = parse_schema({"clash": {"primaryKey": "id", "columns": {"id": "INTEGER", "r": "TEXT", "t": "TEXT"}}})
    with PgmqClient(pg_url) as pg:
        pg.execute("CREATE TABLE clash (id bigint PRIMARY KEY, r text, t text)")
        setup(pg, d1, schema)
        pg.execute("INSERT INTO clash SELECT g, 'r' || g, 't' || g FROM generate_series(1, 50) g")
        apply(pg, d1, schema)
        assert reconcile(pg, d1, schema, chunk_size=20).tables["clash"].total == 0
        d1.query("DELETE FROM clash WHERE id = 7")
        d1.query("UPDATE clash SET r = 'tampered' WHERE id = 9")
        drift = reconcile(pg, d1, schema, chunk_size=20, repair_drift=True).tables["clash"]
        assert drift.missing == [(7,)] and drift.different == [(9,)]
        assert reconcile(pg, d1, schema, chunk_size=20).tables["clash"].total == 0
        Pair(pg, d1, schema).assert_in_sync()
