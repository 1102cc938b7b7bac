"""Dagster: definitions, materializations that really apply, checks on synced and drifted tables, sensor ticks."""

import json
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.definitions import APPLY_JOB, build_definitions
from d1sync_dagster.defs.assets import build_table_assets
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")
APPS, VERSIONS = dg.AssetKey(["d1", "apps"]), dg.AssetKey(["d1", "app_versions"])
CHEAP = ("row_count_matches_source", "replication_lag_under_threshold", "no_dead_letters", "source_matches_schema")


@pytest.fixture
def env(source_db, tmp_path, monkeypatch):
    d1_path = str(tmp_path / "d1.sqlite")
    monkeypatch.setenv("DATABASE_URL", source_db)
    monkeypatch.setenv("D1_LOCAL_PATH", d1_path)
    monkeypatch.setenv("D1SYNC_APPLY_MODE", "run")  # the per-run sensor; the streaming one is tested below
    with PgmqClient(source_db) as pg:
        d1 = LocalD1Client(d1_path)
        setup(pg, d1, SCHEMA)
        yield pg, d1, {"postgres": PostgresResource(database_url=source_db), "d1": D1Resource(local_path=d1_path)}
        d1.close()


def test_definitions_name_assets_checks_jobs_and_sensor():
    defs = build_definitions(str(ROOT / "schema.json"))
    graph = defs.resolve_asset_graph()
    sources = {dg.AssetKey(["postgres", "public", "apps"]), dg.AssetKey(["postgres", "public", "app_versions"])}
    assert set(graph.get_all_asset_keys()) == {APPS, VERSIONS} | sources
    check_names = {k.name for k in graph.asset_check_keys}
    assert check_names == {
        "row_count_matches_source",
        "replication_lag_under_threshold",
        "no_dead_letters",
        "source_matches_schema",
        "rows_match_source",
    }
    assert len(graph.asset_check_keys) == 12  # five per D1 table, one per Postgres source table
    assert defs.resolve_job_def(APPLY_JOB) is not None and defs.resolve_job_def("d1sync_setup") is not None
    assert defs.resolve_sensor_def("pgmq_depth_sensor") is not None
    assert set(defs.resources) >= {"postgres", "d1"}
    spec = next(s for s in graph.asset_nodes if s.key == APPS)
    assert spec.group_name == "d1" and spec.code_version == SCHEMA.table("apps").version
    assert "public.apps" in (spec.description or "")


def test_each_d1_asset_has_its_postgres_table_upstream_and_standard_metadata(tmp_path):
    data = json.loads((ROOT / "schema.json").read_text())
    data["apps"] |= {"owners": ["data@example.com", "team:edge"], "tags": {"tier": "gold"}}
    (tmp_path / "schema.json").write_text(json.dumps(data))
    graph = build_definitions(str(tmp_path / "schema.json")).resolve_asset_graph()
    source = dg.AssetKey(["postgres", "public", "apps"])
    apps = graph.get(APPS)
    assert apps.parent_keys == {source} and graph.get(source).is_external and graph.get(source).kinds == {"postgres"}
    assert apps.owners == ["data@example.com", "team:edge"] and apps.tags.get("tier") == "gold"
    assert apps.metadata["dagster/table_name"].value == "apps"
    md = apps.metadata["dagster/column_schema"]
    columns = {c.name: c.type for c in getattr(md, "schema", md).columns}
    assert columns == dict(SCHEMA.table("apps").columns)
    assert graph.get(VERSIONS).parent_keys == {dg.AssetKey(["postgres", "public", "app_versions"])}


def test_materialize_applies_changes_and_records_metadata(env):
    pg, d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 25) g")
    pg.execute("INSERT INTO app_versions (app_id, version) VALUES (1, 'a')")
    result = dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    assert result.success
    mats = {
        e.event_specific_data.materialization.asset_key: e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats[APPS]["messages"].value == 25 and mats[APPS]["upserts"].value == 25
    assert mats[VERSIONS]["upserts"].value == 1 and mats[APPS]["run_d1_requests"].value >= 1
    assert "| 25 | 25 | 0 | 0 |" in mats[APPS]["summary"].value
    assert "run_planner_peak_mb" not in mats[APPS]  # 25 changes are planned in the run's own process
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 25}]
    assert pg.metrics().queue_length == 0


def test_a_large_drain_records_the_planner_process_memory(env):
    pg, _, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 3000) g")
    result = dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    assert result.success
    (mat,) = [
        e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == APPS
    ]
    assert mat["messages"].value == 3000 and 5 < mat["run_planner_peak_mb"].value < 500


def test_a_subset_drains_the_queue_and_every_table_it_changed_is_recorded(env):
    """The queue is shared: a run of `d1/apps` alone also applies `app_versions`' changes, and records them
    (as a runtime materialization with its checks), so that no applied change is missing from the history;
    a selected table no change reached is recorded too (record_unchanged), an unselected one is not."""
    pg, d1, resources = env
    pg.execute("INSERT INTO app_versions (app_id, version) VALUES (1, 'a')")
    result = dg.materialize([build_table_assets(SCHEMA)], resources=resources, selection=[APPS])
    mats = {e.event_specific_data.materialization.asset_key: e for e in result.get_asset_materialization_events()}
    assert set(mats) == {APPS, VERSIONS} and pg.metrics().queue_length == 0
    assert mats[VERSIONS].event_specific_data.materialization.metadata["messages"].value == 1
    assert mats[APPS].event_specific_data.materialization.metadata["messages"].value == 0
    assert check_outcomes(result)[("app_versions", "row_count_matches_source")] is True
    observed = [
        e.event_specific_data.asset_observation for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert [o.asset_key for o in observed] == [dg.AssetKey(["postgres", "public", "app_versions"])]
    assert observed[0].metadata["changes"].value == 1


def checks_result(resources):
    """The cheap checks alone ("Execute checks" in the UI): nothing is applied."""
    return dg.materialize(
        [build_table_assets(SCHEMA, lag_threshold_seconds=60)],
        resources=resources,
        selection=dg.AssetSelection.all_asset_checks(),
    )


def check_outcomes(result):
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return {(ev.asset_key.path[-1], ev.check_name): ev.passed for ev in evaluations}


def row_count_evaluation(result):
    """The row-count check's evaluation for `apps` in a run."""
    (ev,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.asset_key == APPS
        and e.event_specific_data.check_name == "row_count_matches_source"
    ]
    return ev


def test_checks_pass_on_a_synced_table_and_fail_on_a_drifted_one(env):
    pg, d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 10) g")
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    outcomes = check_outcomes(checks_result(resources))
    assert len(outcomes) == 8 and all(outcomes.values()), outcomes

    d1.query("DELETE FROM apps WHERE id = 3")  # drift behind the pipeline's back
    pg.send_batch([{"type": "INSERT", "table": "apps", "record": {"id": "bad"}}])
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)  # dead-letters the bad message
    outcomes = check_outcomes(checks_result(resources))
    assert outcomes[("apps", "row_count_matches_source")] is False
    assert outcomes[("apps", "no_dead_letters")] is False
    assert outcomes[("app_versions", "row_count_matches_source")] is True


def test_row_count_check_allows_for_queued_changes_but_not_for_more(env):
    """Writers keep writing between an apply and its checks: a count gap the queued row changes explain
    passes (and says so); a gap they cannot explain fails."""
    pg, d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 10) g")
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(11, 15) g")  # 5 queued, not applied
    result = checks_result(resources)
    outcomes = check_outcomes(result)
    assert outcomes[("apps", "row_count_matches_source")] is True
    ev = row_count_evaluation(result)
    assert "5 rows apart, within what the 5 queued row changes explain" in ev.description

    d1.query("DELETE FROM apps WHERE id IN (1, 2)")  # drift: 7 apart, only 5 queued
    assert check_outcomes(checks_result(resources))[("apps", "row_count_matches_source")] is False
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)  # queue empty: the check is exact again
    assert check_outcomes(checks_result(resources))[("apps", "row_count_matches_source")] is False


def test_row_count_check_counts_the_rows_of_a_queued_backfill_range(env):
    """A backfill's range marker carries its row count, not its rows: the check counts those rows."""
    from d1sync_dagster.engine.ranges import enqueue_marker

    pg, _d1, resources = env
    pg.execute("ALTER TABLE apps DISABLE TRIGGER USER")  # rows that only a backfill brings to D1
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 40) g")
    pg.execute("ALTER TABLE apps ENABLE TRIGGER USER")
    enqueue_marker(pg, SCHEMA.table("apps"), None, ["20"], 20)
    enqueue_marker(pg, SCHEMA.table("apps"), ["20"], None, 20)
    result = checks_result(resources)
    assert check_outcomes(result)[("apps", "row_count_matches_source")] is True
    ev = row_count_evaluation(result)
    assert "40 rows apart, within what the 40 queued row changes explain" in ev.description
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)  # applies both ranges
    assert check_outcomes(checks_result(resources))[("apps", "row_count_matches_source")] is True
    (res,) = _d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 40}]


def test_table_health_waits_for_a_running_apply_and_says_when_it_could_not(env, source_db):
    from d1sync_dagster.engine.health import table_health

    pg, d1, _resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    with PgmqClient(source_db) as other, other.consumer_lock() as got:
        assert got  # an apply holds the queue
        started = time.monotonic()
        health = table_health(pg, d1, SCHEMA, wait_for_apply_seconds=0.5)
        assert time.monotonic() - started >= 0.5
        assert health["apps"].apply_running and health["apps"].queued == 1
    health = table_health(pg, d1, SCHEMA)
    assert not health["apps"].apply_running and health["apps"].count_explained


def test_lag_check_fails_when_changes_wait_too_long(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    pg.execute("UPDATE pgmq.q_replicate_data SET enqueued_at = now() - interval '10 minutes'")
    outcomes = check_outcomes(checks_result(resources))
    assert outcomes[("apps", "replication_lag_under_threshold")] is False
    assert outcomes[("app_versions", "replication_lag_under_threshold")] is True


def sensor_tick(instance, resources, cursor=None):
    defs = build_definitions(str(ROOT / "schema.json"))
    sensor = defs.resolve_sensor_def("pgmq_depth_sensor")
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"postgres": resources["postgres"]})
    return sensor, sensor.evaluate_tick(ctx)


@pytest.mark.parametrize("interval, spacing", [(5, 4), (30, 29), (1, 1)])
def test_the_sensor_ticks_on_every_daemon_loop_of_its_interval(monkeypatch, interval, spacing):
    """dagster-daemon looks at sensors every 5 s; a minimum interval equal to the interval would skip a loop
    that comes a moment early (a 5 s sensor then ticks every 10 s), so it is a second less."""
    monkeypatch.setenv("D1SYNC_SENSOR_INTERVAL_SECONDS", str(interval))
    sensor = build_definitions(str(ROOT / "schema.json")).resolve_sensor_def("pgmq_depth_sensor")
    assert sensor.minimum_interval_seconds == spacing
    assert f"Checks every {interval}s" in (sensor.description or "")


def test_sensor_first_tick_on_an_empty_queue_skips_and_says_why(env):
    _pg, _d1, resources = env
    with dg.instance_for_test() as instance:
        _sensor, tick = sensor_tick(instance, resources)
    assert tick.run_requests == [] and "is empty" in tick.skip_message
    assert tick.cursor == "0"


def test_sensor_requests_a_run_when_there_is_work(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x'), (2, 'y')")
    with dg.instance_for_test() as instance:
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
    (req,) = tick.run_requests
    assert req.tags["d1sync/queue_depth"] == "2"
    assert tick.cursor == "2"


def test_sensor_skips_when_nothing_new_after_apply(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    with dg.instance_for_test() as instance:
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
    assert tick.run_requests == [] and "empty" in tick.skip_message


def test_sensor_does_not_pile_up_runs_while_one_is_in_flight(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(
            build_definitions(str(ROOT / "schema.json")).resolve_job_def(APPLY_JOB),
            status=dg.DagsterRunStatus.STARTED,
        )
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        assert tick.run_requests == [] and run.run_id in tick.skip_message and "1 changes waiting" in tick.skip_message
        instance.report_run_failed(run)
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
        assert len(tick.run_requests) == 1


def test_sensor_skips_while_a_cli_apply_holds_the_lock_and_says_who(env, source_db):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    with dg.instance_for_test() as instance, PgmqClient(source_db) as cli, cli.consumer_lock() as got:
        assert got
        ((pid, _app, _since),) = pg.lock_holders()
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
    assert tick.run_requests == []
    assert f"consumer lock is held by pid {pid} (d1sync consumer of replicate_data" in tick.skip_message
    assert "1 changes waiting" in tick.skip_message and "1 new since the last tick" in tick.skip_message


@pytest.mark.parametrize("job", ["d1sync_backfill", "d1sync_nuke", "d1sync_reconcile", "ui_materialization"])
def test_sensor_skips_while_any_run_that_consumes_the_queue_is_in_flight(env, job):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    defs = build_definitions(str(ROOT / "schema.json"))
    with dg.instance_for_test() as instance:
        if job == "ui_materialization":  # "Materialize" on d1/apps in the UI: an implicit asset job
            asset_job = defs.resolve_implicit_global_asset_job_def()
            run = instance.create_run_for_job(
                asset_job, status=dg.DagsterRunStatus.STARTING, asset_selection=frozenset({dg.AssetKey(["d1", "apps"])})
            )
        else:
            run = instance.create_run_for_job(defs.resolve_job_def(job), status=dg.DagsterRunStatus.STARTED)
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
        assert tick.run_requests == [] and run.run_id in tick.skip_message and "consumes the queue" in tick.skip_message
        instance.report_run_failed(run)
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
        assert len(tick.run_requests) == 1 and tick.run_requests[0].run_key is None


def test_sensor_ignores_runs_that_do_not_consume_the_queue(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    defs = build_definitions(str(ROOT / "schema.json"))
    with dg.instance_for_test() as instance:
        instance.create_run_for_job(defs.resolve_job_def("d1sync_doctor"), status=dg.DagsterRunStatus.STARTED)
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
    assert len(tick.run_requests) == 1


def test_every_job_runs_its_steps_in_process():
    defs = build_definitions(str(ROOT / "schema.json"))
    for name in [APPLY_JOB, "d1sync_reconcile", "d1sync_backfill", "d1sync_nuke", "d1sync_setup", "d1sync_doctor"]:
        assert defs.resolve_job_def(name).executor_def is dg.in_process_executor, name


def test_sensor_waits_until_the_d1_budget_of_a_rate_limited_run_is_back(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    with dg.instance_for_test() as instance:
        job = build_definitions(str(ROOT / "schema.json")).resolve_job_def(APPLY_JOB)
        run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.FAILURE)
        soon = datetime.now(UTC) + timedelta(minutes=4)
        instance.add_run_tags(run.run_id, {"d1sync/not_before": soon.isoformat(timespec="seconds")})
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        assert tick.run_requests == [] and "request budget is spent until" in tick.skip_message
        past = datetime.now(UTC) - timedelta(seconds=1)
        instance.add_run_tags(run.run_id, {"d1sync/not_before": past.isoformat(timespec="seconds")})
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        assert len(tick.run_requests) == 1


def run_job(name, resources, config=None):
    defs = build_definitions(str(ROOT / "schema.json"))
    return defs.resolve_job_def(name).execute_in_process(
        resources=resources, run_config={"ops": config} if config else None, raise_on_error=False
    )


def output_metadata(result, op):
    (ev,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and e.step_key == op]
    return ev.event_specific_data.metadata


def test_backfill_nuke_and_reconcile_jobs(env, monkeypatch):
    monkeypatch.setenv("D1SYNC_ALLOW_DESTRUCTIVE", "1")  # this deployment allows the nuke (tests/security)
    pg, d1, resources = env
    pg.execute("ALTER TABLE apps DISABLE TRIGGER USER")
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'pre-existing' FROM generate_series(1, 120) g")
    pg.execute("ALTER TABLE apps ENABLE TRIGGER USER")

    result = run_job("d1sync_backfill", resources, {"d1sync_backfill_op": {"config": {"chunk_size": 50}}})
    assert result.success
    md = output_metadata(result, "d1sync_backfill_op")
    assert md["apps_rows"].value == 120 and md["apps_chunks"].value == 3

    d1.query("DELETE FROM apps WHERE id = 7")
    result = run_job("d1sync_reconcile", resources, {"d1_reconcile_checks": {"config": {"repair": True}}})
    assert result.success
    evaluations = {
        ev.asset_key.path[-1]: ev
        for ev in (e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")
    }
    assert evaluations["apps"].check_name == "rows_match_source" and evaluations["apps"].passed is False
    assert (
        evaluations["apps"].metadata["missing"].value == 1
        and evaluations["apps"].metadata["repair_messages"].value == 1
    )
    assert evaluations["app_versions"].passed is True
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 120}]
    again = run_job("d1sync_reconcile", resources)
    assert all(e.event_specific_data.passed for e in again.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")

    refused = run_job("d1sync_nuke", resources, {"d1sync_nuke_op": {"config": {"all_tables": True}}})
    assert not refused.success
    assert "confirm" in refused.failure_data_for_node("d1sync_nuke_op").user_failure_data.description
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 120}]

    config = {"d1sync_nuke_op": {"config": {"table": "apps", "confirm": True, "purge_queue": True}}}
    assert run_job("d1sync_nuke", resources, config).success
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 0}]


def test_reconcile_schedule_is_defined_daily_by_default():
    defs = build_definitions(str(ROOT / "schema.json"))
    schedule = defs.resolve_schedule_def("d1sync_reconcile_schedule")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.job_name == "d1sync_reconcile"


def test_apply_job_runs_the_cheap_checks_but_not_the_full_comparison(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    result = run_job(APPLY_JOB, resources)
    assert result.success
    names = [
        e.event_specific_data.check_name for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    # four per D1 table, and the source check of each table's Postgres asset
    assert len(names) == 10 and "rows_match_source" not in names


def test_the_doctor_job_says_why_replication_is_broken(env):
    pg, _d1, resources = env
    assert run_job("d1sync_doctor", resources).success
    pg.execute("ALTER TABLE apps DISABLE TRIGGER d1sync_capture_insert")
    result = run_job("d1sync_doctor", resources)
    assert not result.success
    failure = result.failure_data_for_node("d1sync_doctor_op").user_failure_data
    assert "capture triggers disabled" in failure.description and "ENABLE TRIGGER d1sync_capture_insert" in (
        failure.description
    )
    assert "| capture apps | fail |" in failure.metadata["findings"].value


def materializations(result):
    return {
        e.event_specific_data.materialization.asset_key: e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }


def mode_config(**config):
    return {"ops": {"d1_incremental_apply": {"config": config}}}


def test_a_sensor_run_records_and_checks_only_the_tables_its_changes_reached(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    result = dg.materialize(
        [build_table_assets(SCHEMA)], resources=resources, run_config=mode_config(record_unchanged=False)
    )
    assert result.success and set(materializations(result)) == {APPS}
    outcomes = check_outcomes(result)  # the unchanged table costs nothing: no check reads it
    assert set(outcomes) == {("apps", c) for c in CHEAP} and all(outcomes.values()), outcomes
    # No count(*): an apply's materialization carries no whole-table row count (backfill and nuke do).
    assert "dagster/row_count" not in materializations(result)[APPS]
    # A run launched by hand records every selected table, changed or not.
    assert set(materializations(dg.materialize([build_table_assets(SCHEMA)], resources=resources))) == {APPS, VERSIONS}


def without_capture(pg, sql):
    pg.execute("ALTER TABLE apps DISABLE TRIGGER USER")  # rows only a backfill brings to D1
    pg.execute(sql)
    pg.execute("ALTER TABLE apps ENABLE TRIGGER USER")


def test_backfill_as_a_materialization_of_the_selected_table_records_its_figures_and_runs_its_checks(env):
    pg, d1, resources = env
    without_capture(pg, "INSERT INTO apps (id, name) SELECT g, 'old' FROM generate_series(1, 130) g")
    assert check_outcomes(checks_result(resources))[("apps", "row_count_matches_source")] is False
    result = dg.materialize(
        [build_table_assets(SCHEMA)], resources=resources, selection=[APPS],
        run_config=mode_config(mode="backfill", chunk_size=50),
    )  # fmt: skip
    assert result.success
    md = materializations(result)[APPS]
    assert md["operation"].value == "backfill" and md["backfill_rows"].value == 130
    assert md["backfill_chunks"].value == 3 and md["dagster/row_count"].value == 130
    outcomes = check_outcomes(result)
    assert set(outcomes) == {
        ("apps", c)
        for c in (
            "row_count_matches_source",
            "replication_lag_under_threshold",
            "no_dead_letters",
            "source_matches_schema",
        )
    }
    assert all(outcomes.values()), outcomes
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 130}]


def test_a_nuke_records_what_it_dropped_and_fails_the_row_count_check_until_a_backfill(env, monkeypatch):
    monkeypatch.setenv("D1SYNC_ALLOW_DESTRUCTIVE", "1")
    pg, d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 40) g")
    assert all(check_outcomes(dg.materialize([build_table_assets(SCHEMA)], resources=resources)).values())
    result = run_job("d1sync_nuke", resources, {"d1sync_nuke_op": {"config": {"table": "apps", "confirm": True}}})
    assert result.success
    md = materializations(result)[APPS]
    assert md["rows_dropped"].value == 40 and md["dagster/row_count"].value == 0
    assert md["restore_bookmark"].value  # the local backend takes a restore point too
    outcomes = check_outcomes(result)
    assert (
        outcomes[("apps", "row_count_matches_source")] is False and ("app_versions", "no_dead_letters") not in outcomes
    )
    result = dg.materialize(
        [build_table_assets(SCHEMA)], resources=resources, selection=[APPS], run_config=mode_config(mode="backfill")
    )
    assert check_outcomes(result)[("apps", "row_count_matches_source")] is True
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 40}]


def test_a_rebuild_is_refused_unless_destructive_operations_are_on_and_confirmed(env, monkeypatch):
    pg, d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    d1.query("INSERT INTO apps (id, name) VALUES (999, 'stray')")  # only a rebuild removes a row Postgres never had
    refused = dg.materialize(
        [build_table_assets(SCHEMA)],
        resources=resources,
        selection=[APPS],
        run_config=mode_config(mode="rebuild", confirm=True),
        raise_on_error=False,
    )
    assert not refused.success
    failure = refused.failure_data_for_node("d1_incremental_apply").user_failure_data.description
    assert "D1SYNC_ALLOW_DESTRUCTIVE=1" in failure and "Nothing was touched" in failure
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 31}]
    assets = build_table_assets(SCHEMA, allow_destructive=True)
    unconfirmed = dg.materialize(
        [assets], resources=resources, selection=[APPS], run_config=mode_config(mode="rebuild"), raise_on_error=False
    )
    assert not unconfirmed.success
    result = dg.materialize(
        [assets], resources=resources, selection=[APPS], run_config=mode_config(mode="rebuild", confirm=True)
    )
    md = materializations(result)[APPS]
    assert md["operation"].value == "rebuild" and md["rows_dropped"].value == 31 and md["backfill_rows"].value == 30
    assert all(check_outcomes(result).values())
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 30}]


@pytest.fixture
def streaming(env, monkeypatch):
    monkeypatch.setenv("D1SYNC_APPLY_MODE", "stream")
    return env


def test_the_streaming_sensor_keeps_one_stream_run_alive_and_one_standing_by(streaming, source_db):
    pg, _d1, resources = streaming
    defs = build_definitions(str(ROOT / "schema.json"))
    stream_job = defs.resolve_job_def("d1sync_stream")
    with dg.instance_for_test() as instance:
        _sensor, tick = sensor_tick(instance, resources)  # empty queue: a stream still starts, to follow it
        (req,) = tick.run_requests
        assert req.job_name == "d1sync_stream"
        run = instance.create_run_for_job(stream_job, status=dg.DagsterRunStatus.STARTED)
        _sensor, tick = sensor_tick(instance, resources, cursor="0")  # the queue is empty: no age to give
        assert tick.skip_message.startswith("0 changes waiting (0 new since the last tick); run ")
        pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        assert tick.run_requests == [] and f"run {run.run_id} stands by to take over the queue" in tick.skip_message
        instance.report_run_failed(run)
        backfill = instance.create_run_for_job(
            defs.resolve_job_def("d1sync_backfill"), status=dg.DagsterRunStatus.STARTED
        )
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
        assert (
            tick.run_requests == []
            and backfill.run_id in tick.skip_message
            and "consumes the queue" in tick.skip_message
        )
        instance.report_run_failed(backfill)
        with PgmqClient(source_db) as cli, cli.consumer_lock() as got:
            assert got
            _sensor, tick = sensor_tick(instance, resources, cursor="1")
            assert tick.run_requests == [] and "consumer lock is held by pid" in tick.skip_message
        _sensor, tick = sensor_tick(instance, resources, cursor="1")
        assert [r.job_name for r in tick.run_requests] == ["d1sync_stream"]


def test_the_stream_run_applies_changes_written_after_it_started_records_changed_tables_and_ends_on_time(
    streaming, source_db
):
    import threading

    import psycopg

    pg, d1, resources = streaming

    def writer():
        with psycopg.connect(source_db, autocommit=True) as conn:
            for i in range(1, 4):
                time.sleep(0.7)
                conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'n')", [i])

    w = threading.Thread(target=writer)
    w.start()
    started = time.monotonic()
    config = {"d1sync_stream_op": {"config": {"seconds": 4, "record_every_seconds": 0.5}}}
    result = run_job("d1sync_stream", resources, config)
    elapsed = time.monotonic() - started
    w.join()
    assert result.success and elapsed < 10
    mats = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    assert mats and {m.asset_key for m in mats} == {APPS}  # app_versions did not change: no materialization
    assert sum(m.metadata["messages"].value for m in mats) == 3
    assert all(m.metadata["applied_change_age_seconds"].value < 1.0 for m in mats)
    outcomes = check_outcomes(result)
    assert len(outcomes) == 8 and all(outcomes.values()), outcomes
    (res,) = d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 3}]
    md = output_metadata(result, "d1sync_stream_op")
    assert md["messages"].value == 3 and "notifications" in md["wake"].value


def test_the_sensor_trusts_the_consumer_lock_over_run_statuses(streaming, source_db):
    """A run that follows the queue gets a standby at once; when the running one's lock goes (its process
    was killed: the run stays STARTED for ever), the sensor marks it failed, and the standby, which takes the
    lock by itself within a quarter second, is left to follow."""
    _pg, _d1, resources = streaming
    defs = build_definitions(str(ROOT / "schema.json"))
    stream_job = defs.resolve_job_def("d1sync_stream")
    with dg.instance_for_test() as instance, PgmqClient(source_db) as running:
        run = instance.create_run_for_job(stream_job, status=dg.DagsterRunStatus.STARTED)
        running.holder_label = f"run {run.run_id[:8]}"
        later = datetime.now(UTC) + timedelta(minutes=10)
        instance.add_run_tags(run.run_id, {"d1sync/ends_at": later.isoformat(timespec="seconds")})
        with running.consumer_lock() as got:
            assert got
            _sensor, tick = sensor_tick(instance, resources, cursor="0")
            assert len(tick.run_requests) == 1, tick.skip_message
            (req,) = tick.run_requests  # a standby, now, not shortly before the end
            assert req.job_name == "d1sync_stream" and req.tags["d1sync/successor_of"] == run.run_id
            standby = instance.create_run_for_job(stream_job, status=dg.DagsterRunStatus.STARTED)
            _sensor, tick = sensor_tick(instance, resources, cursor="0")
            assert tick.run_requests == [] and f"run {standby.run_id} stands by" in tick.skip_message
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        # kill -9: the connection, and the lock, are gone; the run record still says STARTED.
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        dead = instance.get_run_by_id(run.run_id)
        assert dead.status == dg.DagsterRunStatus.FAILURE
        assert tick.run_requests == [] and f"run {standby.run_id} stands by" in tick.skip_message
        # A run that ends on time and lets go of the lock is not taken for dead.
        done = instance.create_run_for_job(stream_job, status=dg.DagsterRunStatus.STARTED)
        past = datetime.now(UTC) - timedelta(seconds=5)
        instance.add_run_tags(done.run_id, {"d1sync/ends_at": past.isoformat(timespec="seconds")})
        sensor_tick(instance, resources, cursor="0")
        assert instance.get_run_by_id(done.run_id).status == dg.DagsterRunStatus.STARTED


def test_dead_stream_runs_tells_a_standby_that_died_or_never_started_from_a_live_one():
    from types import SimpleNamespace

    from d1sync_dagster.defs.sensors import dead_stream_runs

    now = datetime.now(UTC)
    old = SimpleNamespace(create_timestamp=now - timedelta(minutes=5), start_time=None)
    new = SimpleNamespace(create_timestamp=now - timedelta(seconds=10), start_time=None)

    def run(i, status=dg.DagsterRunStatus.STARTED, **tags):
        return dg.DagsterRun(job_name="d1sync_stream", run_id=f"r{i}-0000-uuid", status=status, tags=tags)

    waiting, gone, fresh, queued = run(1), run(2), run(3), run(4, dg.DagsterRunStatus.NOT_STARTED)
    records = {"r1-0000-uuid": old, "r2-0000-uuid": old, "r3-0000-uuid": new, "r4-0000-uuid": old}
    standbys = [(10, "d1sync standby [run r1-0000-] (pid 5) of q", now)]
    found = dict(
        (r.run_id, why) for r, why in dead_stream_runs([waiting, gone, fresh, queued], records, [], standbys, now, 120)
    )
    assert set(found) == {"r2-0000-uuid", "r4-0000-uuid"}
    assert "neither stands by" in found["r2-0000-uuid"]
    assert "did not start within 120s (not_started)" in found["r4-0000-uuid"]
    # Started 40 s ago and standing by nowhere (the daemon's process group was killed): gone, though it was
    # made less than the start timeout ago; started 5 s ago: still setting up.
    died = SimpleNamespace(create_timestamp=now - timedelta(seconds=60), start_time=now.timestamp() - 40)
    setting_up = SimpleNamespace(create_timestamp=now - timedelta(seconds=60), start_time=now.timestamp() - 5)
    found = dead_stream_runs([run(7), run(8)], {"r7-0000-uuid": died, "r8-0000-uuid": setting_up}, [], [], now, 120)
    assert [r.run_id for r, _ in found] == ["r7-0000-uuid"]
    # A holder whose application name this role cannot read: nobody is given up on a guess.
    hidden = [(11, "", None)]
    assert dead_stream_runs([gone], records, hidden, [], now, 120) == []
    # Stuck long after its end.
    stuck = run(5, **{"d1sync/ends_at": (now - timedelta(minutes=10)).isoformat()})
    assert "should have ended" in dead_stream_runs([stuck], {}, [], [], now, 120)[0][1]
    stopping = run(6, **{"d1sync/ends_at": (now + timedelta(minutes=10)).isoformat(), "d1sync/stopping": "x"})
    assert dead_stream_runs([stopping], {}, [], [], now, 120) == []


# --- The operator's view at production size (issue 26): checks cost the changes, runs the changed tables. ---


def row_check(result, table="apps"):
    (ev,) = [
        e
        for e in result.get_asset_check_evaluations()
        if e.asset_key.path[-1] == table and e.check_name == "row_count_matches_source"
    ]
    return ev


def test_the_per_apply_row_check_reads_the_changed_rows_not_the_table(env):
    """5,000 rows in the table, 3 changed: the check after the apply reads 3 D1 rows (the whole count reads
    5,000, billed), and says so in its metadata."""
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 5000) g")
    dg.materialize([build_table_assets(SCHEMA)], resources=resources)
    pg.execute("UPDATE apps SET name = 'm' WHERE id IN (7, 8)")
    pg.execute("DELETE FROM apps WHERE id = 9")
    result = dg.materialize([build_table_assets(SCHEMA)], resources=resources, selection=[APPS])
    ev = row_check(result)
    md = {k: v.value for k, v in ev.metadata.items()}
    assert ev.passed and md["rows_compared"] == 3 and md["d1_rows_found"] == 2 and md["postgres_rows_found"] == 2
    assert md["d1_rows_read"] <= 3 and md["postgres_rows_read"] == 2, md
    whole = row_check(checks_result(resources))  # "Execute checks" by hand: counted whole, and billed so
    assert whole.passed and whole.metadata["d1_rows_read"].value == 4999


def test_the_per_apply_row_check_fails_on_a_changed_row_that_did_not_land(env):
    """A row D1 refuses (larger than D1's 2 MB row limit) is dead-lettered: the row check compares it by key
    and names it missing, the dead-letter check counts it; rows nobody changed are not read."""
    pg, _d1, resources = env
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'small'), (2, repeat('x', 2100000))")
    result = dg.materialize([build_table_assets(SCHEMA)], resources=resources, selection=[APPS])
    ev = row_check(result)
    assert not ev.passed and ev.metadata["missing"].value == 1 and "[2]" in ev.metadata["sample_keys"].value
    assert "1 missing in D1" in ev.description
    assert check_outcomes(result)[("apps", "no_dead_letters")] is False


def test_table_health_for_changed_keys_names_a_row_changed_behind_the_pipelines_back(env):
    from d1sync_dagster.engine.health import table_health

    pg, d1, _resources = env
    pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 20) g")
    dg.materialize([build_table_assets(SCHEMA)], resources=_resources)
    d1.query("UPDATE apps SET name = 'edited in D1' WHERE id = 4")
    d1.query("DELETE FROM apps WHERE id = 5")
    health = table_health(pg, d1, SCHEMA, tables=["apps"], keys={"apps": [(4,), (5,), (6,)]})
    assert set(health) == {"apps"}
    c = health["apps"].compared
    assert c is not None and c.different == [(4,)] and c.missing == [(5,)] and not health["apps"].count_explained
    assert health["apps"].source_rows is None and health["apps"].d1_rows_read == 2


def test_the_per_run_sensor_selects_only_the_tables_with_queued_changes(env):
    pg, _d1, resources = env
    pg.execute("INSERT INTO app_versions (app_id, version) VALUES (1, 'a')")
    with dg.instance_for_test() as instance:
        _sensor, tick = sensor_tick(instance, resources)
        (req,) = tick.run_requests
        assert req.asset_selection == [VERSIONS]
        pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
        _sensor, tick = sensor_tick(instance, resources)
        assert set(tick.run_requests[0].asset_selection) == {APPS, VERSIONS}


def test_a_sensor_run_of_one_table_out_of_two_hundred_costs_what_the_changed_table_costs(
    source_db, tmp_path, monkeypatch
):
    """A schema of 200 tables, a change in one: the run the sensor requests plans, records and checks that
    table alone, and sends D1 a handful of requests (it used to be 2,010 events and 201 requests)."""
    from d1sync_dagster.clients.d1_local import LocalD1Client as Local

    tables = {f"t{i:03d}": {"primaryKey": ["id"], "columns": {"id": "INTEGER", "v": "TEXT"}} for i in range(200)}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(tables))
    d1_path = str(tmp_path / "d1.sqlite")
    monkeypatch.setenv("D1SYNC_SCHEMA", str(path))
    monkeypatch.setenv("DATABASE_URL", source_db)
    monkeypatch.setenv("D1_LOCAL_PATH", d1_path)
    monkeypatch.setenv("D1SYNC_APPLY_MODE", "run")
    schema = load_schema(path)
    with PgmqClient(source_db) as pg:
        for name in tables:
            pg.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, v text)")
        setup(pg, Local(d1_path), schema)
        pg.execute("INSERT INTO t042 VALUES (1, 'a'), (2, 'b')")
    defs = build_definitions(str(path))
    resources = {"postgres": PostgresResource(database_url=source_db)}
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        (req,) = defs.resolve_sensor_def("pgmq_depth_sensor").evaluate_tick(ctx).run_requests
        assert req.asset_selection == [dg.AssetKey(["d1", "t042"])]
        job = defs.resolve_job_def(APPLY_JOB)
        result = job.execute_in_process(
            instance=instance, run_config=req.run_config, asset_selection=req.asset_selection, raise_on_error=False
        )
        assert result.success
        events = instance.get_records_for_run(result.run_id).records
        mats = {e.event_specific_data.materialization.asset_key for e in result.get_asset_materialization_events()}
        assert mats == {dg.AssetKey(["d1", "t042"])}
        assert {e.asset_key.path[-1] for e in result.get_asset_check_evaluations()} == {"t042"}
        assert len(events) < 60, len(events)
        (md,) = [m.event_specific_data.materialization.metadata for m in result.get_asset_materialization_events()]
        assert md["run_d1_requests"].value <= 3


def test_the_stream_records_at_a_bounded_cadence_with_checks_figures_and_source_observations(streaming, source_db):
    """A writer writes all the time; with a record every 1.5 s a 5 s run records at most 5 materializations of
    the table (the figures summed), each with the table's checks, and observes its Postgres source as often."""
    import threading

    import psycopg

    _pg, d1, resources = streaming
    stop = threading.Event()

    def writer():
        with psycopg.connect(source_db, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'n')", [i])
                time.sleep(0.02)

    w = threading.Thread(target=writer)
    w.start()
    config = {"d1sync_stream_op": {"config": {"seconds": 5, "record_every_seconds": 1.5}}}
    try:
        result = run_job("d1sync_stream", resources, config)
    finally:
        stop.set()
        w.join()
    assert result.success
    mats = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == APPS
    ]
    assert 2 <= len(mats) <= 5, len(mats)
    assert (
        sum(m.metadata["messages"].value for m in mats) == output_metadata(result, "d1sync_stream_op")["messages"].value
    )
    rates = [(m.metadata["run_changes_per_second"].value, m.metadata["run_duration_seconds"].value) for m in mats]
    assert all(r > 0 and s > 0 for r, s in rates), rates
    rows = [
        e
        for e in result.get_asset_check_evaluations()
        if e.asset_key == APPS and e.check_name == "row_count_matches_source"
    ]
    assert len(rows) == len(mats) and all(e.passed for e in rows), [e.description for e in rows]
    reads = [(e.metadata["d1_rows_read"].value, e.metadata["rows_compared"].value) for e in rows]
    assert all(0 < read <= compared for read, compared in reads), reads
    observed = [
        e.event_specific_data.asset_observation for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert len(observed) == len(mats) and all(o.metadata["changes"].value > 0 for o in observed)
    # The table no change reached is checked once, at the end.
    quiet = [e for e in result.get_asset_check_evaluations() if e.asset_key == VERSIONS]
    assert len(quiet) == 4 and all(e.passed for e in quiet)


def test_a_ui_backfill_while_the_stream_runs_hands_its_chunks_over_and_records_them(env, source_db):
    """The streaming run holds the queue: the backfill's chunks are applied by it, the materialization waits
    for them to land, then records the backfill's figures (and who applied them) and runs the checks."""
    import threading

    from d1sync_dagster.engine.stream import StreamOptions, follow_queue

    pg, d1, resources = env
    without_capture(pg, "INSERT INTO apps (id, name) SELECT g, 'old' FROM generate_series(1, 130) g")
    stop, following = threading.Event(), threading.Event()

    def stream():
        with PgmqClient(source_db) as own:
            for landed in follow_queue(own, d1, SCHEMA, StreamOptions(seconds=120, poll_seconds=0.2), stop=stop):
                if landed.following_since:
                    following.set()

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert following.wait(30)
        result = dg.materialize(
            [build_table_assets(SCHEMA)],
            resources=resources,
            selection=[APPS],
            run_config=mode_config(mode="backfill", chunk_size=50),
        )
    finally:
        stop.set()
        t.join()
    assert result.success
    md = materializations(result)[APPS]
    assert md["backfill_rows"].value == 130 and md["dagster/row_count"].value == 130
    assert "d1sync consumer" in md["applied_by"].value
    assert check_outcomes(result)[("apps", "row_count_matches_source")] is True


def test_the_streaming_sensor_fails_the_lag_checks_while_nothing_applies_the_queue(streaming, source_db, monkeypatch):
    """Staleness shows while nothing runs: changes wait past the lag threshold and nobody applies them (here a
    CLI holds the lock; the stream may be down): the sensor fails those tables' lag checks itself, once a
    minute at most."""
    pg, _d1, resources = streaming
    monkeypatch.setenv("D1SYNC_LAG_THRESHOLD_SECONDS", "1")
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    time.sleep(2.2)  # older than the threshold (pgmq counts whole seconds)
    with dg.instance_for_test() as instance, PgmqClient(source_db) as cli, cli.consumer_lock() as got:
        assert got
        _sensor, tick = sensor_tick(instance, resources, cursor="0")
        (ev,) = tick.asset_events
        assert ev.asset_key == APPS and ev.check_name == "replication_lag_under_threshold" and not ev.passed
        assert ev.metadata["oldest_waiting_seconds"].value >= 2 and "evaluated by pgmq_depth_sensor" in ev.description
        assert "consumer lock is held" in tick.skip_message
        _sensor, again = sensor_tick(instance, resources, cursor=tick.cursor)
        assert again.asset_events == []  # not again within the minute
