"""Who may drop a D1 table: destructive Dagster jobs are off unless the deployment allows them, they record
who launched them and their restore point, a read-only webserver launches nothing, and `d1sync dev` warns
before it listens beyond this machine."""

import json
import subprocess
import sys
from contextlib import closing

import dagster as dg
import httpx
import pytest

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.config import allow_destructive
from d1sync_dagster.definitions import build_definitions
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.dev import host_warning
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.engine.status import status
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import dagster_webserver, graphql_repositories

SCHEMA = load_schema(ROOT / "schema.json")
NUKE = {"ops": {"d1sync_nuke_op": {"config": {"all_tables": True, "confirm": True, "purge_queue": True}}}}


@pytest.fixture
def replica(source_db, tmp_path, monkeypatch):
    """A replicated pair with rows in D1, a queued change and a dead letter (what a purge would drop)."""
    monkeypatch.delenv("D1SYNC_ALLOW_DESTRUCTIVE", raising=False)
    d1_path = tmp_path / "d1" / "d1.sqlite"
    d1_path.parent.mkdir()
    with PgmqClient(source_db) as pg, closing(LocalD1Client(d1_path)) as d1:
        setup(pg, d1, SCHEMA)
        pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
        run = build_definitions(str(ROOT / "schema.json"))
        resources = {"postgres": PostgresResource(database_url=source_db), "d1": D1Resource(local_path=str(d1_path))}
        assert run.resolve_job_def("d1sync_apply").execute_in_process(resources=resources).success
        pg.execute("UPDATE apps SET name = 'queued' WHERE id = 1")
        pg.send_batch([{"type": "INSERT", "table": "apps", "record": {"id": "not a number"}}], queue=pg.dlq)
        yield pg, d1, resources


def state(pg, d1):
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    return res.results[0]["n"], pg.metrics().queue_length, pg.metrics(pg.dlq).queue_length


def nuke_through_dagster(resources, instance=None):
    job = build_definitions(str(ROOT / "schema.json")).resolve_job_def("d1sync_nuke")
    return job.execute_in_process(run_config=NUKE, resources=resources, instance=instance, raise_on_error=False)


def test_without_the_variable_a_nuke_through_dagster_refuses_and_touches_nothing(replica):
    pg, d1, resources = replica
    before = state(pg, d1)
    assert before == (30, 1, 1)
    backups = sorted(p.name for p in d1.path.parent.iterdir())
    with dg.instance_for_test() as instance:
        result = nuke_through_dagster(resources, instance)
        # a refusal is expected behaviour: the run ends without an error (no red step, no stack trace), says why
        # in its log and output, and is tagged as refused
        assert result.success
        (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        why = output.event_specific_data.metadata["refused"].value
        assert "disabled in this Dagster deployment" in why and "D1SYNC_ALLOW_DESTRUCTIVE=1" in why
        assert "Nothing was touched" in why and "`d1sync nuke --table <name> --yes`" in why
        assert instance.get_run_by_id(result.run_id).tags["d1sync/refused"] == "destructive operations are disabled"
        assert not [e for e in result.all_events if e.event_type_value in ("STEP_FAILURE", "ASSET_MATERIALIZATION")]
    assert state(pg, d1) == before  # D1, the queue and the dead letters as they were
    assert sorted(p.name for p in d1.path.parent.iterdir()) == backups  # not even a restore point taken
    description = build_definitions(str(ROOT / "schema.json")).resolve_job_def("d1sync_nuke").description
    assert "Disabled in this deployment" in description


def test_with_the_variable_it_nukes_and_records_launcher_and_restore_point(replica, monkeypatch):
    pg, d1, resources = replica
    monkeypatch.setenv("D1SYNC_ALLOW_DESTRUCTIVE", "1")
    with dg.instance_for_test() as instance:
        result = nuke_through_dagster(resources, instance)
        assert result.success
        assert state(pg, d1) == (0, 0, 0)
        tags = instance.get_run_by_id(result.run_id).tags
        restore_point = tags["d1sync/restore_point"]
        assert restore_point.startswith("file:") and tags["d1sync/destructive"] == "nuke"
        assert tags["d1sync/source"] == "ui" and tags["d1sync/launched_by"].startswith("unknown")
        for table in ("apps", "app_versions"):  # each table's own history says what happened to it
            event = instance.get_latest_materialization_event(dg.AssetKey(["d1", table]))
            md = event.asset_materialization.metadata
            assert md["restore_bookmark"].value == restore_point and md["launched_from"].value == "ui"
            assert md["operation"].value.startswith("nuke")
    record = status(pg, d1, SCHEMA).last_nuke
    assert record["restore_point"] == restore_point and record["source"] == "ui"
    assert record["tables"] == ["apps", "app_versions"] and record["purge_queue"] is True


def test_the_job_description_says_whether_it_is_enabled(monkeypatch):
    for value, says in (("", "Disabled in this deployment"), ("1", "Enabled in this deployment")):
        monkeypatch.setenv("D1SYNC_ALLOW_DESTRUCTIVE", value)
        job = build_definitions(str(ROOT / "schema.json")).resolve_job_def("d1sync_nuke")
        assert says in (job.description or "")


def test_a_run_from_a_sensor_or_dagster_plus_names_its_launcher():
    from d1sync_dagster.defs.guard import Launcher

    run = dg.DagsterRun(job_name="d1sync_nuke", tags={"dagster/sensor_name": "s", "user": "ana@example.com"})
    assert Launcher.of(run) == Launcher(user="ana@example.com", source="sensor s")
    run = dg.DagsterRun(job_name="d1sync_nuke", tags={"dagster/schedule_name": "nightly"})
    assert Launcher.of(run).source == "schedule nightly"


@pytest.mark.parametrize("value", ["yes please", "2", "enable"])
def test_an_unclear_value_of_the_variable_is_an_error_not_a_guess(value):
    with pytest.raises(ConfigError, match="D1SYNC_ALLOW_DESTRUCTIVE must be 1"):
        allow_destructive({"D1SYNC_ALLOW_DESTRUCTIVE": value})
    assert allow_destructive({}) is False and allow_destructive({"D1SYNC_ALLOW_DESTRUCTIVE": "TRUE"}) is True


def test_the_command_line_nuke_records_its_launcher(replica, source_db):
    pg, d1, _ = replica
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(d1.path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "nuke", "--table", "apps", "--yes"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    st = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "status", "--json"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    record = json.loads(st.stdout)["last_nuke"]
    assert record["source"] == "cli" and record["tables"] == ["apps"] and record["restore_point"].startswith("file:")


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) { __typename ... on UnauthorizedError { message } }
}
"""
LOCATION = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"


def test_a_read_only_webserver_refuses_to_launch_runs(tmp_path):
    with dagster_webserver(tmp_path, "--read-only", env={"D1SYNC_ALLOW_DESTRUCTIVE": "1"}) as url:
        (repo,) = graphql_repositories(url, LOCATION)
        selector = {"repositoryLocationName": repo["location"]["name"], "repositoryName": repo["name"]}
        params = {"selector": selector | {"jobName": "d1sync_nuke"}, "runConfigData": NUKE}
        answer = httpx.post(
            f"{url}/graphql", json={"query": LAUNCH, "variables": {"params": params}}, timeout=30
        ).json()
        assert answer["data"]["launchRun"]["__typename"] == "UnauthorizedError", answer
        runs = httpx.post(f"{url}/graphql", json={"query": "{ runsOrError { ... on Runs { count } } }"}).json()
        assert runs["data"]["runsOrError"]["count"] == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_warning(host):
    assert host_warning(host) is None


def test_dev_warns_loudly_before_listening_beyond_this_machine(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "dev", "--host", "0.0.0.0", "--schema", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "D1SYNC_ALLOW_DESTRUCTIVE": "1", "D1SYNC_STATE_DIR": str(tmp_path)},
    )
    assert out.returncode == 2  # the missing schema stops it, after the warning
    assert "WARNING: the Dagster UI will listen on 0.0.0.0" in out.stdout and "has no login" in out.stdout
    assert "including d1sync_nuke" in out.stdout
