"""Several D1 databases from one Postgres: targets in one code location (keys, jobs, resources, sensors per
target, one source asset for both), both converging under a writer, a failing target not stopping the other,
and two d1sync Components loaded next to a user's own asset."""

import json
import threading

import dagster as dg
import psycopg
import pytest

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.definitions import build_definitions
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.capture import example_source_tables
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")


@pytest.fixture
def targets(source_db, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", source_db)
    monkeypatch.setenv("D1SYNC_APPLY_MODE", "run")
    with PgmqClient(source_db) as pg:
        pg.execute(example_source_tables())
    files = {"prod": tmp_path / "prod.sqlite", "staging": tmp_path / "staging.sqlite"}
    data = {
        "prod": {"queue": "replicate_data", "d1": {"localPath": str(files["prod"])}},
        "staging": {"queue": "replicate_staging", "tables": ["apps"], "d1": {"localPath": str(files["staging"])}},
    }
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(data))
    return str(path), files, data


def run(defs, job, config=None):
    return defs.resolve_job_def(job).execute_in_process(run_config=config or {}, raise_on_error=False)


def test_each_target_has_its_own_assets_jobs_sensor_and_resources(targets):
    path, _files, _data = targets
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=path)
    graph = defs.resolve_asset_graph()
    d1_keys = {k for k in graph.get_all_asset_keys() if k.path[0] == "d1"}
    assert d1_keys == {
        dg.AssetKey(["d1", "prod", "apps"]),
        dg.AssetKey(["d1", "prod", "app_versions"]),
        dg.AssetKey(["d1", "staging", "apps"]),
    }
    source = dg.AssetKey(["postgres", "public", "apps"])
    assert graph.get(source).child_keys == {dg.AssetKey(["d1", "prod", "apps"]), dg.AssetKey(["d1", "staging", "apps"])}
    for job in ("d1sync_apply", "d1sync_stream", "d1sync_backfill", "d1sync_nuke", "d1sync_setup", "d1sync_reconcile"):
        assert defs.resolve_job_def(f"{job}_prod") and defs.resolve_job_def(f"{job}_staging")
    assert defs.resolve_sensor_def("pgmq_depth_sensor_prod") and defs.resolve_sensor_def("pgmq_depth_sensor_staging")
    assert {"postgres_prod", "d1_prod", "postgres_staging", "d1_staging"} <= set(defs.resources)
    assert defs.resources["postgres_staging"].queue == "replicate_staging"
    # One consumer per target: every step that consumes a target's queue is in that target's pool.
    apply_node = defs.resolve_job_def("d1sync_apply_staging").graph.node_defs[0]
    assert apply_node.pool == "d1sync_staging"


def test_two_targets_converge_under_a_writer_and_a_failing_target_does_not_stop_the_other(targets, source_db):
    path, files, data = targets
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=path)
    assert run(defs, "d1sync_setup_prod").success and run(defs, "d1sync_setup_staging").success
    failed: list[BaseException] = []

    def writer():
        try:
            with psycopg.connect(source_db, autocommit=True) as conn:
                for i in range(40):
                    conn.execute(
                        "INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(%s::bigint, %s::bigint) g",
                        [i * 5, i * 5 + 4],
                    )
                    conn.execute("UPDATE apps SET name = name || '.' WHERE id %% 3 = %s", [i % 3])
                    conn.execute("INSERT INTO app_versions (app_id, version) VALUES (%s, 'v')", [i])
        except BaseException as e:
            failed.append(e)

    w = threading.Thread(target=writer)
    w.start()
    while w.is_alive():
        assert run(defs, "d1sync_apply_prod").success and run(defs, "d1sync_apply_staging").success
    w.join()
    assert not failed
    assert run(defs, "d1sync_apply_prod").success and run(defs, "d1sync_apply_staging").success
    with PgmqClient(source_db) as pg:
        prod, staging = LocalD1Client(str(files["prod"])), LocalD1Client(str(files["staging"]))
        for t in SCHEMA.tables:
            assert diff(pg_rows(pg, t), d1_rows(prod, t)).total == 0
        assert diff(pg_rows(pg, SCHEMA.table("apps")), d1_rows(staging, SCHEMA.table("apps"))).total == 0
        assert staging.query("SELECT name FROM sqlite_master WHERE name = 'app_versions'")[0].results == []
        staging.close()

        # Staging's D1 breaks: its runs fail, its changes wait in its queue; production goes on.
        data["staging"]["d1"]["localPath"] = "/proc/no-such-dir/staging.sqlite"
        (files["prod"].parent / "targets.json").write_text(json.dumps(data))
        defs = build_definitions(str(ROOT / "schema.json"), targets_file=path)
        pg.execute("INSERT INTO apps (id, name) VALUES (100000, 'after the break')")
        assert not run(defs, "d1sync_apply_staging").success
        assert run(defs, "d1sync_apply_prod").success
        assert diff(pg_rows(pg, SCHEMA.table("apps")), d1_rows(prod, SCHEMA.table("apps"))).total == 0
        with PgmqClient(source_db, queue="replicate_staging") as staged:
            assert staged.metrics().queue_length == 1  # nothing lost: it waits for staging's D1
        prod.close()


def test_a_targets_file_with_a_mistake_says_which(tmp_path):
    bad = {
        "a": {"queue": "q_one", "d1": {"localPath": "a.sqlite"}},
        "b": {"queue": "q_one", "d1": {"localPath": "b.sqlite"}},
    }
    (tmp_path / "t.json").write_text(json.dumps(bad))
    from d1sync_dagster.errors import ConfigError

    with pytest.raises(ConfigError, match="targets a and b both use queue q_one"):
        build_definitions(str(ROOT / "schema.json"), targets_file=str(tmp_path / "t.json"))
    bad = {"a": {"queue": "q_one", "d1": {"accountIdEnv": "X", "localPath": "a.sqlite"}}}
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="needs all three"):
        build_definitions(str(ROOT / "schema.json"), targets_file=str(tmp_path / "t.json"))
    bad = {"a": {"queue": "q_one", "tables": ["nope"], "d1": {"localPath": "a.sqlite"}}}
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="tables nope are not in schema.json"):
        build_definitions(str(ROOT / "schema.json"), targets_file=str(tmp_path / "t.json"))


def test_two_components_load_in_one_code_location_next_to_a_users_own_asset(tmp_path, monkeypatch, source_db):
    monkeypatch.setenv("DATABASE_URL", source_db)
    project = tmp_path / "proj"
    defs_dir = project / "src" / "proj" / "defs"
    for name in ("edge", "analytics"):
        folder = defs_dir / name
        folder.mkdir(parents=True)
        (folder / "schema.json").write_text((ROOT / "schema.json").read_text())
        (folder / "defs.yaml").write_text(
            "type: d1sync_dagster.components.D1SyncComponent\n"
            "attributes:\n"
            "  schema_file: schema.json\n"
            f"  key_prefix: [{name}]\n"
            f"  postgres_resource_key: postgres_{name}\n"
            f"  d1_resource_key: d1_{name}\n"
        )
    (defs_dir / "mine").mkdir()
    (defs_dir / "mine" / "assets.py").write_text("import dagster as dg\n\n@dg.asset\ndef my_report():\n    return 1\n")
    for pkg in (project / "src" / "proj", defs_dir):
        (pkg / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "proj"\nversion = "0"\n[tool.dg]\ndirectory_type = "project"\n'
        '[tool.dg.project]\nroot_module = "proj"\n'
    )
    monkeypatch.syspath_prepend(str(project / "src"))
    defs = dg.load_from_defs_folder(project_root=project)
    keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    assert dg.AssetKey(["edge", "d1", "apps"]) in keys and dg.AssetKey(["analytics", "d1", "apps"]) in keys
    assert dg.AssetKey("my_report") in keys
    assert defs.resolve_job_def("edge_d1sync_apply") and defs.resolve_job_def("analytics_d1sync_apply")
    assert {"postgres_edge", "d1_edge", "postgres_analytics", "d1_analytics"} <= set(defs.resources)


def test_dg_finds_the_component_through_the_package_entry_point():
    from dagster.components.core.package_entry import discover_entry_point_package_objects

    names = {(k.namespace, k.name) for k in discover_entry_point_package_objects()}
    assert ("d1sync_dagster.components", "D1SyncComponent") in names
