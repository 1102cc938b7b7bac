"""Dagster: the definitions load and the setup job runs against real Postgres and D1."""

import subprocess
import sys

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.definitions import build_definitions
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT


def test_workspace_validates_with_the_dagster_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "All code locations passed validation" in out.stdout + out.stderr


def test_setup_job_runs_with_injected_resources(source_db, tmp_path):
    defs = build_definitions(str(ROOT / "schema.json"))
    job = defs.get_job_def("d1sync_setup")
    result = job.execute_in_process(
        resources={
            "postgres": PostgresResource(database_url=source_db),
            "d1": D1Resource(local_path=str(tmp_path / "d1.sqlite")),
        }
    )
    assert result.success
    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    d1 = LocalD1Client(tmp_path / "d1.sqlite")
    (res,) = d1.query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    assert [r["name"] for r in res.results] == ["_d1sync_meta", "app_versions", "apps"]
    metadata = output.step_output_data.metadata
    assert (
        metadata["tables"].value == 2
        and metadata["schema_version"].value == load_schema(str(ROOT / "schema.json")).version
    )


def test_setup_job_failure_is_a_dagster_failure_with_the_reason(tmp_path):
    defs = build_definitions(str(ROOT / "schema.json"))
    result = defs.get_job_def("d1sync_setup").execute_in_process(
        resources={
            "postgres": PostgresResource(database_url="postgresql://u:pw123secret@127.0.0.1:1/x"),
            "d1": D1Resource(local_path=str(tmp_path / "d1.sqlite")),
        },
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("d1sync_setup_op")
    assert "cannot connect to Postgres" in str(failure.error.message) + str(failure.user_failure_data)
    assert "pw123secret" not in str(failure.error.to_string())


def test_d1_resource_picks_http_when_account_is_set():
    fake = "tok-not-in-repr"  # not a credential
    r = D1Resource(account_id="a", database_id="d", api_token=fake, local_path="x.sqlite")
    assert r.settings().backend == "http"
    assert fake not in repr(r.settings())


def test_a_wrong_apply_mode_or_a_missing_targets_file_is_a_clear_error(monkeypatch, tmp_path):
    import pytest

    from d1sync_dagster.errors import ConfigError

    monkeypatch.setenv("D1SYNC_APPLY_MODE", "fast")
    with pytest.raises(ConfigError, match="D1SYNC_APPLY_MODE must be one of stream, run, not 'fast'"):
        build_definitions(str(ROOT / "schema.json"))
    monkeypatch.delenv("D1SYNC_APPLY_MODE")
    monkeypatch.setenv("D1SYNC_TARGETS", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="cannot read targets file"):
        build_definitions(str(ROOT / "schema.json"))
    (tmp_path / "nope.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        build_definitions(str(ROOT / "schema.json"))


def test_the_planner_process_setting_is_read_strictly(monkeypatch):
    import pytest

    from d1sync_dagster import config
    from d1sync_dagster.errors import ConfigError

    assert config.planner_process({}) is True and config.planner_process({"D1SYNC_PLANNER_PROCESS": "0"}) is False
    monkeypatch.setenv("D1SYNC_PLANNER_PROCESS", "yes")
    with pytest.raises(ConfigError, match="D1SYNC_PLANNER_PROCESS must be 1 or 0, got 'yes'"):
        build_definitions(str(ROOT / "schema.json"))


def test_loading_the_code_location_prints_no_beta_warning_for_sensor_owners():
    """Dagster copies the sensor with `owners=[]` when it binds its jobs, which its beta marker reported on
    every reload although d1sync sets no owners; that warning alone is silenced."""
    import subprocess
    import sys

    code = (
        "from d1sync_dagster.definitions import defs\n"
        "defs.get_repository_def().get_all_jobs()\n"
        "defs.resolve_sensor_def('pgmq_depth_sensor')\n"
    )
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BetaWarning" not in out.stderr, out.stderr
