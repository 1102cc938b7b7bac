"""The README's run command, driven headless: `d1sync dev` on the embedded defaults (no DATABASE_URL: an
embedded Postgres, the local D1 file) starts the Dagster UI and daemon and writes live rows; the sensor starts
apply runs; the `d1/*` assets materialize with non-zero changes and passing checks; a screenshot of the asset
graph is saved; Ctrl-C (SIGINT) stops every process it started, the embedded Postgres included."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import psutil
import pytest

from tests.conftest import ROOT, free_port
from tests.ui.browser import png_size, screenshot

MATERIALIZATIONS = """
query ($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset {
      assetMaterializations(limit: 20) {
        runId
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
  }
}
"""

RUN = """
query ($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run {
      status
      tags { key value }
      eventConnection {
        events { __typename ... on AssetCheckEvaluationEvent { evaluation { checkName success description } } }
      }
    }
  }
}
"""


def graphql(url: str, query: str, variables: dict) -> dict:
    body = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30).json()
    assert "errors" not in body, body
    return body["data"]


def applied_changes(url: str) -> list[tuple[str, int]]:
    """(run id, messages) of the materializations of d1/apps that applied changes."""
    try:
        asset = graphql(url, MATERIALIZATIONS, {"path": ["d1", "apps"]})["assetOrError"]
    except (httpx.TransportError, ValueError):
        return []
    out = []
    for m in asset.get("assetMaterializations") or []:
        figures = {e["label"]: e.get("intValue") for e in m["metadataEntries"]}
        if figures.get("messages"):
            out.append((m["runId"], figures["messages"]))
    return out


@pytest.fixture
def dev(tmp_path, request):
    """`d1sync dev` on a free port (extra arguments by indirect parametrization)."""
    extra = list(getattr(request, "param", []))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("CLOUDFLARE_")}
    env |= {"D1SYNC_STATE_DIR": str(tmp_path / "state"), "D1SYNC_SENSOR_INTERVAL_SECONDS": "2"}
    env |= {"D1SYNC_STREAM_SECONDS": "20"}  # the streaming run ends, with its checks, while the test watches
    env.pop("D1_LOCAL_PATH", None)
    exe = Path(sys.executable).parent / "d1sync"
    log = open(tmp_path / "dev.out", "w+")  # noqa: SIM115 - read back after the process ends
    proc = subprocess.Popen(
        [str(exe), "dev", "--schema", str(ROOT / "schema.json"), "--port", str(port), "--every", "1", *extra],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # SIGINT goes to its group, like Ctrl-C in a terminal
    )
    try:
        yield proc, f"http://127.0.0.1:{port}", tmp_path / "state", log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_dev_runs_the_demo_and_ctrl_c_stops_everything(dev):
    proc, url, state, log = dev
    deadline = time.monotonic() + 300
    applied: list[tuple[str, int]] = []
    while time.monotonic() < deadline and proc.poll() is None:
        applied = applied_changes(url)
        if applied:
            break
        time.sleep(2)
    log.seek(0)
    assert applied, f"no materialization of d1/apps with changes within 300 s; d1sync dev said:\n{log.read()}"
    run_id, messages = applied[0]
    assert messages > 0

    run = graphql(url, RUN, {"runId": run_id})["runOrError"]
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags.get("dagster/sensor_name") == "pgmq_depth_sensor"  # started by the sensor, not by hand
    deadline = time.monotonic() + 60
    while run["status"] in ("STARTED", "STARTING", "QUEUED") and time.monotonic() < deadline:
        time.sleep(1)
        run = graphql(url, RUN, {"runId": run_id})["runOrError"]
    assert run["status"] == "SUCCESS"
    checks = [
        e["evaluation"] for e in run["eventConnection"]["events"] if e["__typename"] == "AssetCheckEvaluationEvent"
    ]
    # Each recorded materialization comes with its table's checks; the tables no change reached get theirs
    # when the run ends: every check of both tables (four each, and each source's) at least once.
    assert len(checks) >= 10 and all(c["success"] for c in checks), checks
    assert {c["checkName"] for c in checks} == {
        "row_count_matches_source",
        "replication_lag_under_threshold",
        "no_dead_letters",
        "source_matches_schema",
    }

    # The global lineage shows the two groups, Postgres sources upstream of the D1 tables (collapsed: Dagster
    # folds groups in the global view); an asset's own lineage shows the tables themselves.
    shot, seen = screenshot(f"{url}/asset-groups", "asset-graph.png", wait_for=["postgres", "d1"])
    assert seen["title"] == "Global asset lineage"
    assert png_size(shot) == (1600, 1000) and shot.stat().st_size > 20_000
    shot, seen = screenshot(
        f"{url}/assets/d1/apps?view=lineage", "apps-lineage.png", wait_for=["postgres", "Postgres", "SQLite"]
    )
    assert seen["title"] == "Assets | d1 / apps"
    assert png_size(shot) == (1600, 1000) and shot.stat().st_size > 20_000

    started = psutil.Process(proc.pid).children(recursive=True)
    assert any("dagster-webserver" in " ".join(p.cmdline()) for p in started)
    assert any("dagster-daemon" in " ".join(p.cmdline()) for p in started)
    postmaster = int((state / "postgres" / "postmaster.pid").read_text().split()[0])

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) == 0
    log.seek(0)
    said = log.read()
    assert "stopped the Dagster processes and the embedded Postgres" in said, said
    gone, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/server_info", timeout=2)
    # One code server of dev's own, which the daemon's workspace reloads do not replace every minute (each
    # replaced one logged "No heartbeat received in 20 seconds, shutting down").
    logged = "".join(p.read_text(errors="replace") for p in (state / "logs").glob("*.log"))
    assert "No heartbeat received" not in logged
    # Ctrl-C is a clean stop: the streaming runs that followed the queue ended as successes, not failures (a
    # standby still starting up at that moment may fail, as any Dagster run interrupted in its start-up).
    with dg.DagsterInstance.from_config(str(state / "dagster")) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="d1sync_stream"))
    followed = [r for r in runs if "d1sync/ends_at" in r.tags]
    assert followed and all(r.status == dg.DagsterRunStatus.SUCCESS for r in followed), [
        (r.run_id, r.status) for r in runs
    ]


@pytest.mark.parametrize("dev", [["--instance-postgres"]], indirect=True)
def test_dev_can_keep_the_dagster_instance_in_postgres(dev):
    """`--instance-postgres`: the instance of docs/deploy.md (Postgres storage through psycopg2, run
    monitoring) in a database of its own; the sensor starts the stream, which applies the demo's changes, and
    Dagster's runs are rows in that database."""
    proc, url, state, log = dev
    deadline = time.monotonic() + 300
    applied: list[tuple[str, int]] = []
    while time.monotonic() < deadline and proc.poll() is None and not applied:
        applied = applied_changes(url)
        time.sleep(2)
    log.seek(0)
    assert applied, f"no materialization with changes within 300 s; d1sync dev said:\n{log.read()}"
    instance = (state / "dagster" / "dagster.yaml").read_text()
    assert (
        "postgres_db:" in instance
        and "scheme: postgresql+psycopg2" in instance
        and "password" not in (instance.replace("password: {env: DAGSTER_PG_PASSWORD}", ""))
    )
    os.environ.setdefault("DAGSTER_PG_PASSWORD", "")  # (the embedded Postgres trusts local connections)
    with dg.DagsterInstance.from_config(str(state / "dagster")) as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        assert inst.get_runs(dg.RunsFilter(job_name="d1sync_stream"))
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0


def test_dev_leaves_an_embedded_postgres_it_did_not_start_running(tmp_path, monkeypatch):
    """Another d1sync command started the embedded Postgres: `d1sync dev` uses it and, when it stops, leaves
    it running for whoever else uses it."""
    import io

    import psycopg

    from d1sync_dagster import embedded
    from d1sync_dagster.dev import DevOptions, run_dev

    for k in [k for k in os.environ if k == "DATABASE_URL" or k.startswith(("CLOUDFLARE_", "D1_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("D1SYNC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster-home"))
    pgdata = tmp_path / "state" / "postgres"
    url = embedded.source_url()  # as `d1sync setup` would, with no DATABASE_URL
    try:
        assert embedded.running(pgdata)
        out = io.StringIO()
        opts = DevOptions(
            schema_file=str(ROOT / "schema.json"),
            queue="replicate_data",
            port=free_port(),
            stop_after_seconds=3,
            out=out,
        )
        assert run_dev(opts, install_signal_handlers=False) == 0
        said = out.getvalue()
        assert "using the embedded Postgres already running" in said, said
        assert "was running before and keeps running" in said and "and the embedded Postgres" not in said, said
        assert embedded.running(pgdata)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM apps").fetchone()[0] > 0  # dev wrote into it
    finally:
        embedded.stop(pgdata)
    assert not embedded.running(pgdata)
