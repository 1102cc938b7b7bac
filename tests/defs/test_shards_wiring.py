"""Shards as users configure and run them: targets.json's `shards` and `shardBy` (and every mistake in
them named), the Dagster assets and checks of a sharded table, and the command line (setup, apply, verify
per shard, backfill of one shard, the readers' `d1sync shards`)."""

import json
import os
import sqlite3
import subprocess
import sys

import dagster as dg
import psycopg
import pytest

from d1sync_dagster.clients.d1_shards import ShardedD1
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.shards import shard_for
from d1sync_dagster.definitions import build_definitions
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.capture import example_source_tables
from d1sync_dagster.targets import load_targets, open_d1
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")
RULE = {"column": "app_id", "hash": ["s0", "s1", "s2"]}


def targets_file(tmp_path, **change):
    target = {
        "queue": "replicate_data",
        "d1": {"localPath": str(tmp_path / "home.sqlite")},
        "shards": {s: {"localPath": str(tmp_path / f"{s}.sqlite")} for s in RULE["hash"]},
        "shardBy": {"app_versions": RULE},
    } | change
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"prod": target}))
    return str(path)


def test_a_sharded_target_loads_and_opens_every_database(tmp_path):
    (target,) = load_targets(SCHEMA, targets_file(tmp_path))
    assert [s for s, _ in target.shards] == ["s0", "s1", "s2"] and target.rules[0].column == "app_id"
    d1 = open_d1(target)
    try:
        assert isinstance(d1, ShardedD1) and set(d1.shards) == {"s0", "s1", "s2"}
        assert [s for s, _ in d1.databases_of("app_versions")] == ["s0", "s1", "s2"]
        assert [s for s, _ in d1.databases_of("apps")] == [None]
    finally:
        d1.close()
    assert "localPath" in (target.shards_json() or "") and "apiToken" not in (target.shards_json() or "")


@pytest.mark.parametrize(
    "change, says",
    [
        ({"shardBy": {"app_versions": {"column": "app_id", "hash": ["s0", "s9"]}}}, "shard(s) s9 are not in `shards`"),
        ({"shardBy": {"apps": {"column": "rating", "hash": ["s0"]}}}, "column rating is REAL"),
        ({"shardBy": {"app_versions": {"column": "nope", "hash": ["s0"]}}}, "'nope' is not a column of app_versions"),
        ({"shardBy": {"app_versions": {"column": "app_id", "map": {"1": "s0"}}}}, "give `hash`"),
        ({"shards": {}}, "shardBy needs `shards`"),
        ({"shards": {"S0": {"localPath": "x.sqlite"}}, "shardBy": {}}, "shard name 'S0'"),
        ({"shards": {"s0": {"localPath": "same"}, "s1": {"localPath": "same"}}, "shardBy": {}}, "use one local file"),
        ({"shards": {"s0": {"localPath": "x/s"}, "s1": {"localPath": "x/./s"}}, "shardBy": {}}, "use one local file"),
        ({"tables": ["apps"]}, "shardBy.app_versions: not a table of this target"),
    ],
)
def test_every_mistake_in_the_shard_configuration_is_named(tmp_path, change, says, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_targets(SCHEMA, targets_file(tmp_path, **change))


@pytest.fixture
def prod(source_db, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", source_db)
    monkeypatch.setenv("D1SYNC_APPLY_MODE", "run")
    with PgmqClient(source_db) as pg:
        pg.execute(example_source_tables())
    return targets_file(tmp_path)


def test_dagster_applies_into_the_shards_and_the_row_count_check_sums_them(prod, source_db, tmp_path):
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=prod)
    assert defs.resolve_job_def("d1sync_setup").execute_in_process().success
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 30) g")
        conn.execute(
            "INSERT INTO app_versions (app_id, version) SELECT g % 30 + 1, 'v' || g FROM generate_series(1, 300) g"
        )
    result = defs.resolve_job_def("d1sync_apply").execute_in_process(raise_on_error=False)
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key.path[-1] == "app_versions"}
    count = checks["row_count_matches_source"]
    # The rows the apply changed, looked up by key in every shard (each found in its own): 300 reads.
    assert (
        count.passed and count.metadata["d1_rows_found"].value == 300 and count.metadata["rows_compared"].value == 300
    )
    assert count.metadata["d1_rows_read"].value == 300
    per_shard = {s: count.metadata[f"d1_rows_found_{s}"].value for s in RULE["hash"]}
    assert sum(per_shard.values()) == 300 and all(per_shard.values())
    for s, n in per_shard.items():
        with sqlite3.connect(tmp_path / f"{s}.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM app_versions").fetchone()[0] == n
            ids = [r[0] for r in conn.execute("SELECT app_id FROM app_versions")]
        assert {shard_for(RULE, i) for i in ids} == {s}
    with sqlite3.connect(tmp_path / "home.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM apps").fetchone()[0] == 30
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'app_versions'").fetchall()
    key = dg.AssetKey(["d1", "app_versions"])
    graph = defs.resolve_asset_graph()
    assert key in graph.get_all_asset_keys()
    # The sharded table's asset is partitioned by shard; the apply (a run of the unsharded tables) recorded
    # its changes as a materialization of each shard they reached, with what that shard got.
    assert graph.get(key).partitions_def.get_partition_keys() == RULE["hash"]
    assert graph.get(dg.AssetKey(["d1", "apps"])).partitions_def is None
    mats = [m.materialization for m in result.get_asset_materialization_events() if m.asset_key == key]
    assert sorted(m.partition for m in mats) == RULE["hash"]
    for m in mats:
        assert (
            m.metadata["shard"].value == m.partition
            and m.metadata["shard_rows_written"].value == per_shard[m.partition]
        )
        assert m.metadata["messages"].value == 300 and m.metadata["shard_statements"].value >= 1
    # A backfill of one shard: a materialization of the asset's partition (UI: Materialize, pick the shard).
    with sqlite3.connect(tmp_path / "s1.sqlite") as conn:
        conn.execute("DELETE FROM app_versions")
    job = defs.resolve_implicit_global_asset_job_def()
    again = job.execute_in_process(asset_selection=[key], partition_key="s1", raise_on_error=False)
    assert again.success
    (mat,) = [m for m in again.get_asset_materialization_events() if m.asset_key == key]
    assert mat.partition == "s1" and mat.materialization.metadata["backfill_rows"].value == 300  # all read
    assert mat.materialization.metadata["shard_rows"].value == per_shard["s1"]  # only s1's written
    with sqlite3.connect(tmp_path / "s1.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM app_versions").fetchone()[0] == per_shard["s1"]
    checks = {e.check_name: e for e in again.get_asset_check_evaluations()}
    assert checks["row_count_matches_source"].passed and checks["no_dead_letters"].passed
    # A rebuild is of the whole table, never of one shard's partition.
    config = {"ops": {"d1_incremental_apply": {"config": {"mode": "rebuild", "confirm": True}}}}
    refused = job.execute_in_process(asset_selection=[key], partition_key="s2", run_config=config, raise_on_error=False)
    assert not refused.success
    assert "a rebuild drops the whole table in every shard" in str(refused.all_events)


def cli(*args, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DATABASE_URL", "D1_"))}
    return subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", *args], capture_output=True, text=True, env=base | env, cwd=ROOT
    )


def test_the_command_line_sets_up_applies_verifies_per_shard_and_routes_for_readers(prod, source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1SYNC_TARGETS": prod}
    assert cli("setup", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 10) g")
        conn.execute(
            "INSERT INTO app_versions (app_id, version) SELECT g % 10 + 1, 'v' || g FROM generate_series(1, 90) g"
        )
    assert cli("apply", env=env).returncode == 0
    verify = cli("verify", env=env)
    assert verify.returncode == 0, verify.stderr
    assert "app_versions: 90 rows in Postgres, 90 in D1, in sync" in verify.stdout
    assert verify.stdout.count("  shard s") == 3
    with sqlite3.connect(tmp_path / "s1.sqlite") as conn:
        conn.execute("DELETE FROM app_versions")
    one = cli("verify", "--shard", "s1", "--json", env=env)
    found = json.loads(one.stdout)["tables"]["app_versions"]
    assert one.returncode == 1 and set(found["shards"]) == {"s1"} and found["missing"] > 0
    assert cli("backfill", "--shard", "s1", env=env).returncode == 0
    assert cli("verify", env=env).returncode == 0
    routed = cli("shards", "--table", "app_versions", "--value", "7", "--json", env=env)
    assert json.loads(routed.stdout) == {"table": "app_versions", "value": 7, "shard": shard_for(RULE, 7)}
    rules = json.loads(cli("shards", "--json", env=env).stdout)
    assert rules == {"shards": ["s0", "s1", "s2"], "shardBy": {"app_versions": RULE}}
    bad = cli("shards", "--table", "app_versions", "--value", "x", env=env)
    assert bad.returncode == 2 and "app_id is INTEGER: 'x' is not an integer" in bad.stderr
    status = json.loads(cli("status", "--json", env=env).stdout)
    assert set(status["shards"]) == {"s0", "s1", "s2"}
    # doctor checks every database; a shard whose schema is behind is named with its fix.
    with sqlite3.connect(tmp_path / "s2.sqlite") as conn:
        conn.execute("UPDATE _d1sync_meta SET value = 'old' WHERE key = 'schema_version'")
    doctor = cli("doctor", "--json", env=env)
    found = {f["check"]: f for f in json.loads(doctor.stdout)["findings"]}
    assert doctor.returncode == 1 and found["d1 (shard s0)"]["level"] == "ok"
    assert (
        found["schema version (shard s2)"]["level"] == "fail"
        and "d1sync setup" in found["schema version (shard s2)"]["fix"]
    )


def test_shards_reached_with_one_token_share_its_api_budget(tmp_path):
    spec = {"accountIdEnv": "ACC", "databaseIdEnv": "DB_A", "apiTokenEnv": "TOKEN"}
    shards = {"a": spec, "b": spec | {"databaseIdEnv": "DB_B"}, "c": spec | {"apiTokenEnv": "OTHER_TOKEN"}}
    path = tmp_path / "targets.json"
    path.write_text(
        json.dumps(
            {
                "prod": {
                    "queue": "replicate_data",
                    "d1": {"localPath": str(tmp_path / "home.sqlite")},
                    "shards": shards,
                    "shardBy": {"app_versions": {"column": "app_id", "hash": ["a", "b", "c"]}},
                }
            }
        )
    )
    (target,) = load_targets(SCHEMA, path)
    env = {"ACC": "acct", "DB_A": "a", "DB_B": "b", "TOKEN": "t1", "OTHER_TOKEN": "t2"}
    d1 = open_d1(target, env)
    try:
        assert d1.shards["a"].budget is d1.shards["b"].budget
        assert d1.shards["c"].budget is not d1.shards["a"].budget
    finally:
        d1.close()
    with pytest.raises(ConfigError, match="the environment has no DB_B"):
        open_d1(target, {k: v for k, v in env.items() if k != "DB_B"})


def test_one_file_under_two_spellings_or_a_symlink_is_refused_across_shards_and_targets(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    same = {
        "s0": {"localPath": str(tmp_path / "real" / "a.sqlite")},
        "s1": {"localPath": str(tmp_path / "link" / "a.sqlite")},
    }
    with pytest.raises(ConfigError, match="shard s0 and target prod, shard s1 use one local file"):
        load_targets(SCHEMA, targets_file(tmp_path, shards=same, shardBy={}))
    two = {
        "a": {"queue": "q_one", "d1": {"localPath": str(tmp_path / "x.sqlite")}},
        "b": {"queue": "q_two", "d1": {"localPath": str(tmp_path / "." / "y" / ".." / "x.sqlite")}},
    }
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two))
    with pytest.raises(ConfigError, match="target a and target b use one local file"):
        load_targets(SCHEMA, str(path))


def test_a_partitioned_job_backfills_one_shard_per_partition(prod, source_db, tmp_path):
    """`d1sync_backfill_shards` (the sharded tables' assets, partitioned by shard): Dagster's Backfills page
    launches a run per shard and shows each partition's status. A partition's run writes its shard's rows only,
    and records the partition's materialization with that shard's figures."""
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=prod)
    job = defs.resolve_job_def("d1sync_backfill_shards")
    assert job.partitions_def is not None and job.partitions_def.get_partition_keys() == RULE["hash"]
    assert defs.resolve_job_def("d1sync_setup").execute_in_process().success
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 30) g")
        conn.execute("ALTER TABLE app_versions DISABLE TRIGGER USER")  # rows only a backfill brings to D1
        conn.execute(
            "INSERT INTO app_versions (app_id, version) SELECT g % 30 + 1, 'v' || g FROM generate_series(1, 300) g"
        )
        conn.execute("ALTER TABLE app_versions ENABLE TRIGGER USER")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(partition_key="s1", instance=instance)
        assert result.success
        (mat,) = [m.event_specific_data.materialization for m in result.get_asset_materialization_events()]
        # The partition's status is what the UI shows: s1 materialized, the other shards not yet.
        assert instance.get_materialized_partitions(dg.AssetKey(["d1", "app_versions"])) == {"s1"}
    want = sum(1 for g in range(1, 301) if shard_for(RULE, g % 30 + 1) == "s1")
    assert mat.asset_key == dg.AssetKey(["d1", "app_versions"]) and mat.metadata["shard"].value == "s1"
    assert mat.partition == "s1" and mat.metadata["dagster/row_count"].value == want
    assert mat.metadata["shard_rows"].value == want and mat.metadata["backfill_rows"].value == 300
    counts = {}
    for s in RULE["hash"]:
        with sqlite3.connect(tmp_path / f"{s}.sqlite") as conn:
            counts[s] = conn.execute("SELECT count(*) FROM app_versions").fetchone()[0]
    assert counts == {"s0": 0, "s1": want, "s2": 0}


def test_the_sensor_runs_the_sharded_tables_job_when_only_they_changed_and_it_records_each_shard(prod, source_db):
    """The apply job holds the unsharded tables (a job's assets share one partitioning). Changes to the
    sharded table alone start `d1sync_apply_shards`, which selects it; every run records a sharded table's
    changes as materializations of the shards they reached."""
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=prod)
    assert defs.resolve_job_def("d1sync_setup").execute_in_process().success
    versions, apps = dg.AssetKey(["d1", "app_versions"]), dg.AssetKey(["d1", "apps"])
    sensor = defs.resolve_sensor_def("pgmq_depth_sensor")
    resources = {"postgres": defs.resources["postgres"]}  # type: ignore[index]
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) VALUES (1, 'a')")
        conn.execute("INSERT INTO app_versions (app_id, version) VALUES (1, 'x'), (2, 'y')")
    with dg.instance_for_test() as instance:
        (req,) = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=resources)).run_requests
        assert req.job_name == "d1sync_apply" and req.asset_selection == [apps]
        assert defs.resolve_job_def("d1sync_apply").execute_in_process(instance=instance).success
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO app_versions (app_id, version) SELECT g, 'z' FROM generate_series(3, 40) g")
        (req,) = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=resources)).run_requests
        assert req.job_name == "d1sync_apply_shards" and req.asset_selection == [versions]
        job = defs.resolve_job_def("d1sync_apply_shards")
        result = job.execute_in_process(
            instance=instance, asset_selection=req.asset_selection, run_config=req.run_config
        )
        assert result.success
        mats = [m.materialization for m in result.get_asset_materialization_events()]
        routed = {shard_for(RULE, i) for i in range(3, 41)}
        assert {m.partition for m in mats} == routed and {m.asset_key for m in mats} == {versions}
        assert sum(m.metadata["shard_rows_written"].value for m in mats) == 38
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["row_count_matches_source"] and checks["no_dead_letters"]
        # Both runs' partitions, as the asset's Partitions tab shows them.
        assert instance.get_materialized_partitions(versions) == routed | {shard_for(RULE, 1), shard_for(RULE, 2)}


def test_the_streaming_run_and_the_nuke_record_a_sharded_table_per_shard(prod, source_db, monkeypatch):
    monkeypatch.setenv("D1SYNC_ALLOW_DESTRUCTIVE", "1")
    defs = build_definitions(str(ROOT / "schema.json"), targets_file=prod)
    assert defs.resolve_job_def("d1sync_setup").execute_in_process().success
    versions = dg.AssetKey(["d1", "app_versions"])
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO app_versions (app_id, version) SELECT g, 'v' FROM generate_series(1, 60) g")
    config = {"ops": {"d1sync_stream_op": {"config": {"seconds": 2, "record_every_seconds": 0.5}}}}
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("d1sync_stream").execute_in_process(instance=instance, run_config=config)
        assert result.success
        mats = [m.materialization for m in result.get_asset_materialization_events() if m.asset_key == versions]
        assert {m.partition for m in mats} == set(RULE["hash"])  # 60 app ids spread over the three shards
        assert sum(m.metadata["shard_rows_written"].value for m in mats) == 60
        nuke = {"ops": {"d1sync_nuke_op": {"config": {"table": "app_versions", "confirm": True}}}}
        nuked = defs.resolve_job_def("d1sync_nuke").execute_in_process(instance=instance, run_config=nuke)
        assert nuked.success
        dropped = {
            m.materialization.partition: m.materialization.metadata["rows_dropped"].value
            for m in nuked.get_asset_materialization_events()
        }
        assert set(dropped) == set(RULE["hash"]) and sum(dropped.values()) == 60
