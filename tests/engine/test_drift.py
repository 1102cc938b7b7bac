"""Migrations on replicated tables under a concurrent writer: the application's writes never fail, nothing is
lost, drift is named with its fix, and D1 converges once schema.json follows (real DDL, real Postgres)."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from d1sync_dagster.engine.doctor import capture_findings
from d1sync_dagster.engine.drift import check
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.engine.status import status
from d1sync_dagster.schema import parse_schema
from tests.conftest import ROOT
from tests.helpers import Pair


class Writer:
    """The application: inserts, updates and deletes rows of `apps` (only columns no test drops) and of
    `app_versions`, each in its own transaction, until stopped; every error it meets is kept."""

    def __init__(self, url: str, start: int) -> None:
        self.url, self.next, self.errors, self.writes = url, start, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                i = self.next
                self.next += 1
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO apps (id, name) VALUES (%s, %s)", [i, f"app {i}"])
                        conn.execute("UPDATE apps SET name = name || '+' WHERE id = %s", [i - 3])
                        conn.execute("DELETE FROM apps WHERE id = %s", [i - 7])
                        conn.execute(
                            "INSERT INTO app_versions (app_id, version, downloads) VALUES (%s, '1', %s) "
                            "ON CONFLICT (app_id, version) DO UPDATE SET downloads = excluded.downloads + 1",
                            [i % 5, i],
                        )
                    self.writes += 1
                except psycopg.Error as e:  # the application's write failed: what this issue forbids
                    self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.002)

    def wait(self, writes: int) -> None:
        deadline = time.monotonic() + 30
        while self.writes < writes and time.monotonic() < deadline:
            time.sleep(0.01)


def schema_with(**changes: dict | None):
    """The example schema.json with `apps`' columns changed (a value None removes the column)."""
    data = json.loads((ROOT / "schema.json").read_text())
    cols = data["apps"]["columns"]
    for name, typ in changes.items():
        if typ is None:
            cols.pop(name)
        elif isinstance(typ, tuple):  # (new name,) renames, keeping the type and the order
            data["apps"]["columns"] = {typ[0] if c == name else c: t for c, t in cols.items()}
            cols = data["apps"]["columns"]
            data["apps"]["indexes"] = [
                typ[0] if i == name else [typ[0] if c == name else c for c in i] if isinstance(i, list) else i
                for i in data["apps"]["indexes"]
            ]
        else:
            cols[name] = typ
    data["apps"]["indexes"] = [
        i for i in data["apps"]["indexes"] if all(c in cols for c in (i if isinstance(i, list) else [i]))
    ]
    return parse_schema(data)


def held(pair: Pair) -> dict[str, int]:
    return pair.pg.held_by_table()


def d1_columns(pair: Pair) -> list[str]:
    (res,) = pair.d1.query("SELECT name FROM pragma_table_info('apps') ORDER BY cid")
    return [r["name"] for r in res.results]


def run_migration(pair: Pair, source_db: str, ddl: str) -> Writer:
    """Rows with owners and ratings first, then the writer; the DDL runs under it, and apply runs before,
    during and after. Returns the (stopped) writer."""
    pair.sql(
        "INSERT INTO apps (id, name, owner_id, rating, is_public) SELECT g, 'seed', gen_random_uuid(), g / 4.0, "
        "g % 2 = 0 FROM generate_series(1, 50) g"
    )
    with Writer(source_db, 1000) as writer:
        writer.wait(20)
        pair.apply()
        pair.sql(ddl)
        writer.wait(writer.writes + 40)
        report = pair.apply()
        writer.wait(writer.writes + 20)
    pair.apply()
    assert writer.errors == [], writer.errors[:3]
    assert writer.writes > 80
    pair.report = report  # type: ignore[attr-defined]
    return writer


def test_dropped_replicated_column_holds_its_table_names_the_fix_and_converges(pair, source_db):
    run_migration(pair, source_db, "ALTER TABLE apps DROP COLUMN rating")
    # Held, named, never written as NULL; the other table kept flowing.
    assert held(pair).get("apps", 0) > 0 and pair.dead_letters() == []
    assert pair.report.tables["apps"].held > 0
    assert any("rating" in d and "remove" in d for d in pair.report.drift["apps"])
    pair.assert_in_sync(["app_versions"])
    (finding,) = [f for f in capture_findings(pair.pg, pair.schema) if f.check == "schema apps.rating"]
    assert finding.level == "fail" and "no longer in the Postgres table" in finding.detail
    assert 'remove "rating"' in finding.fix and "d1sync setup" in finding.fix
    assert status(pair.pg, pair.d1, pair.schema).held["apps"] > 0
    verify = reconcile(pair.pg, pair.d1, pair.schema)
    assert not verify.in_sync and "rating" in verify.tables["apps"].problems[0]
    # schema.json follows, setup runs: D1 drops the column, every held change arrives.
    new = schema_with(rating=None)
    result = setup(pair.pg, pair.d1, new)
    assert "apps.rating" in result.dropped_columns
    follows = Pair(pair.pg, pair.d1, new)
    report = follows.apply()
    assert report.released > 0 and held(follows) == {} and follows.dead_letters() == []
    assert "rating" not in d1_columns(follows)
    follows.assert_in_sync()
    assert check(pair.pg, new) == {}


def test_renamed_replicated_column_keeps_its_data_in_d1(pair, source_db):
    run_migration(pair, source_db, "ALTER TABLE apps RENAME COLUMN owner_id TO owner")
    assert held(pair).get("apps", 0) > 0 and pair.dead_letters() == []
    (d,) = check(pair.pg, pair.schema)["apps"]
    assert d.kind == "renamed" and d.renamed_to == "owner" and 'rename "owner_id" to "owner"' in d.fix
    new = schema_with(owner_id=("owner",))
    result = setup(pair.pg, pair.d1, new)
    assert result.renamed_columns == ["apps.owner_id -> owner"] and result.backfilled_tables == []
    follows = Pair(pair.pg, pair.d1, new)
    follows.apply()
    assert held(follows) == {} and follows.dead_letters() == []
    assert "owner" in d1_columns(follows) and "owner_id" not in d1_columns(follows)
    (res,) = follows.d1.query("SELECT count(*) AS n FROM apps WHERE owner IS NOT NULL")
    assert res.results[0]["n"] > 0  # the seed rows' owners were kept through the rename, not backfilled
    follows.assert_in_sync()


def test_retyped_column_whose_values_no_longer_convert_is_held_and_verify_names_the_key(pair, source_db):
    ddl = (
        "ALTER TABLE apps ALTER COLUMN is_public DROP DEFAULT, ALTER COLUMN is_public TYPE integer USING "
        "is_public::int, ALTER COLUMN is_public SET DEFAULT 0; UPDATE apps SET is_public = 7 WHERE id = 3"
    )
    run_migration(pair, source_db, ddl)
    assert pair.dead_letters() == [] and held(pair).get("apps", 0) > 0
    (d,) = check(pair.pg, pair.schema)["apps"]
    assert d.kind == "retyped" and d.holds and 'set "is_public" to "INTEGER"' in d.fix
    # verify and reconcile name the table, the key and the reason instead of crashing
    verify = reconcile(pair.pg, pair.d1, pair.schema)
    bad = verify.tables["apps"].unconvertible
    assert not verify.in_sync and list(bad) == [(3,)] and "is_public" in bad[(3,)]
    new = schema_with(is_public="INTEGER")
    setup(pair.pg, pair.d1, new)
    follows = Pair(pair.pg, pair.d1, new)
    follows.apply()
    assert held(follows) == {} and follows.dead_letters() == []
    follows.assert_in_sync()
    (res,) = follows.d1.query("SELECT is_public FROM apps WHERE id = 3")
    assert res.results == [{"is_public": 7}]


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE apps DROP COLUMN secret_note",
        "ALTER TABLE apps RENAME COLUMN secret_note TO note",
        "ALTER TABLE apps ADD COLUMN flags int NOT NULL DEFAULT 3",
        "ALTER TABLE apps ADD COLUMN name_len int GENERATED ALWAYS AS (length(name)) STORED",
        "ALTER TABLE apps ALTER COLUMN name SET DEFAULT 'x', ALTER COLUMN owner_id SET DEFAULT gen_random_uuid()",
        "ALTER TABLE apps ALTER COLUMN id TYPE numeric(20)",
    ],
    ids=["drop-other", "rename-other", "add-not-null", "add-generated", "defaults", "widen-key-type"],
)
def test_migrations_that_keep_every_replicated_column_change_nothing(pair, source_db, ddl):
    run_migration(pair, source_db, ddl)
    assert held(pair) == {} and pair.dead_letters() == []
    pair.assert_in_sync()


def test_the_event_trigger_names_the_drift_in_the_session_that_runs_the_ddl(pair, source_db):
    said: list[str] = []
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: said.append(d.message_primary or ""))
        conn.execute("ALTER TABLE apps RENAME COLUMN owner_id TO owner")
        conn.execute("INSERT INTO apps (id, name, owner) VALUES (1, 'x', gen_random_uuid())")
    assert any("owner_id" in s and "renamed to owner" in s and "d1sync setup" in s for s in said), said


def test_dagster_checks_on_the_d1_table_and_its_postgres_source_name_the_drift_and_its_fix(local_pair, source_db):
    import dagster as dg

    from d1sync_dagster.defs.assets import build_table_assets, source_spec
    from d1sync_dagster.defs.checks import build_source_checks
    from d1sync_dagster.defs.resources import D1Resource, PostgresResource

    pair = local_pair
    run_migration(pair, source_db, "ALTER TABLE apps DROP COLUMN rating")
    resources = {
        "postgres": PostgresResource(database_url=source_db),
        "d1": D1Resource(local_path=str(pair.d1.path)),
    }
    sources = [source_spec(t) for t in pair.schema.tables]
    result = dg.materialize(
        [*sources, build_table_assets(pair.schema), build_source_checks(pair.schema)],
        resources=resources,
        selection=dg.AssetSelection.groups("d1"),
    )
    assert result.success
    evaluations = {
        (tuple(e.event_specific_data.asset_key.path), e.event_specific_data.check_name): e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    for key in (("d1", "apps"), ("postgres", "public", "apps")):
        ev = evaluations[(key, "source_matches_schema")]
        assert ev.passed is False and 'remove "rating"' in ev.description and "d1sync setup" in ev.description
        assert ev.metadata["held_changes"].value > 0
    assert evaluations[(("d1", "app_versions"), "source_matches_schema")].passed is True
    # the source check alone, as the UI's "Execute checks" runs it
    alone = dg.materialize(
        [*sources, build_source_checks(pair.schema)],
        resources=resources,
        selection=dg.AssetSelection.all_asset_checks(),
    )
    passed = {
        e.event_specific_data.asset_key.path[-1]: e.event_specific_data.passed
        for e in alone.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert passed == {"apps": False, "app_versions": True}
