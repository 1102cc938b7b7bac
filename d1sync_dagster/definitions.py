"""Builds one `Definitions` from `schema.json`; `workspace.yaml` loads `defs` from here.

Secrets are wired as `dg.EnvVar`, so they are read when a run uses a resource and never stored in run
config. The D1 backend is the HTTP API when the `CLOUDFLARE_*` variables are set (all three, as
`config.d1_settings` checks), else the local SQLite file.
"""

from __future__ import annotations

import os

import dagster as dg

from d1sync_dagster import config
from d1sync_dagster.defs.assets import GROUP, asset_key, build_table_assets, source_spec
from d1sync_dagster.defs.checks import all_cheap_check_keys, build_reconcile_checks
from d1sync_dagster.defs.jobs import build_backfill_job, build_doctor_job, build_nuke_job, build_setup_job
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.defs.sensors import build_depth_sensor
from d1sync_dagster.defs.stream import build_stream_job
from d1sync_dagster.engine.apply import ApplyOptions
from d1sync_dagster.engine.stream import StreamOptions
from d1sync_dagster.schema import load_schema

APPLY_JOB = "d1sync_apply"


def build_d1_resource() -> D1Resource:
    """The D1 resource for the backend `config.d1_settings` chose (and validated: all three Cloudflare
    variables or none). The ids and the token reach the resource as `dg.EnvVar`, read when a run uses it."""
    settings = config.d1_settings()
    if settings.backend == "http":
        account, database, token = (dg.EnvVar(v) for v in config.CLOUDFLARE_VARS)
        return D1Resource(
            account_id=account,
            database_id=database,
            api_token=token,
            base_url=settings.base_url,
            attempts=settings.attempts,
        )
    return D1Resource(local_path=settings.local_path)


def build_definitions(schema_file: str | None = None) -> dg.Definitions:
    """All d1sync definitions for one `schema.json`.

    Destructive jobs are disabled unless `D1SYNC_ALLOW_DESTRUCTIVE=1` (see `defs/guard.py`).
    Tunables from the environment: `D1SYNC_APPLY_MODE` (`stream`, the default: the sensor keeps one
    `d1sync_stream` run alive; `run`: the sensor starts a short `d1sync_apply` run when changes wait),
    `D1SYNC_STREAM_SECONDS` (default 900, how long a streaming run lasts),
    `D1SYNC_SENSOR_INTERVAL_SECONDS` (default 30), `D1SYNC_LAG_THRESHOLD_SECONDS`
    (default 300), `D1SYNC_BATCH_SIZE` (default 2000), `D1SYNC_RECONCILE_CRON` (default `0 3 * * *`).
    """
    schema = load_schema(schema_file or config.schema_path())
    lag_threshold = config.number("D1SYNC_LAG_THRESHOLD_SECONDS", 300)
    allow_destructive = config.allow_destructive()
    apply_options = ApplyOptions(batch_size=int(config.number("D1SYNC_BATCH_SIZE", 2000)))
    tables = build_table_assets(
        schema,
        options=apply_options,
        lag_threshold_seconds=lag_threshold,
        allow_destructive=allow_destructive,
    )
    reconcile_cron = os.environ.get("D1SYNC_RECONCILE_CRON") or "0 3 * * *"
    drift = build_reconcile_checks(schema, cron=reconcile_cron)
    # The apply job runs the cheap checks in the same step as the apply, never the full comparison.
    apply_job = dg.define_asset_job(
        APPLY_JOB,
        selection=dg.AssetSelection.groups(GROUP).without_checks()
        | dg.AssetSelection.checks(*all_cheap_check_keys(schema)),
        description="Apply queued changes to every D1 table, then run each table's checks.",
    )
    reconcile_job = dg.define_asset_job(
        "d1sync_reconcile",
        selection=dg.AssetSelection.checks(drift),
        description="Full comparison of every table with Postgres; repairs drift through the queue (config: repair).",
    )
    backfill_job = build_backfill_job(schema)
    nuke_job = build_nuke_job(schema, allow_destructive=allow_destructive, lag_threshold_seconds=lag_threshold)
    stream_job = build_stream_job(
        schema,
        options=apply_options,
        defaults=StreamOptions(seconds=config.number("D1SYNC_STREAM_SECONDS", 900)),
        lag_threshold_seconds=lag_threshold,
    )
    streaming = config.apply_mode() == "stream"
    sensor = build_depth_sensor(
        apply_job,
        stream_job=stream_job if streaming else None,
        interval_seconds=int(config.number("D1SYNC_SENSOR_INTERVAL_SECONDS", 30)),
        consumers=[backfill_job.name, nuke_job.name, reconcile_job.name, stream_job.name],
        asset_keys=[asset_key(t) for t in schema.tables],
        # A sensor run records a materialization only for the tables its changes reached.
        run_config={"ops": {tables.node_def.name: {"config": {"record_unchanged": False}}}},
    )
    schedule = dg.ScheduleDefinition(
        name="d1sync_reconcile_schedule",
        job=reconcile_job,
        cron_schedule=reconcile_cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Full reconciliation of every table (compare and repair), daily by default.",
    )
    return dg.Definitions(
        assets=[*(source_spec(t) for t in schema.tables), tables],
        asset_checks=[drift],
        sensors=[sensor],
        schedules=[schedule],
        jobs=[
            apply_job,
            stream_job,
            build_setup_job(schema),
            build_doctor_job(schema),
            backfill_job,
            nuke_job,
            reconcile_job,
        ],
        # Every job runs its steps in the run worker: the multiprocess default starts a Python process per
        # step (about 5 s each on a small machine), which made a sensor-started apply take 9-24 s for well
        # under a second of work.
        executor=dg.in_process_executor,
        resources={
            "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL"), queue=config.queue_name()),
            "d1": build_d1_resource(),
        },
    )


defs = build_definitions()
