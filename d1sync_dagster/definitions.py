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
from d1sync_dagster.defs.checks import build_reconcile_checks, build_table_checks
from d1sync_dagster.defs.jobs import build_backfill_job, build_doctor_job, build_nuke_job, build_setup_job
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.defs.sensors import build_depth_sensor
from d1sync_dagster.engine.apply import ApplyOptions
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
    Tunables from the environment: `D1SYNC_SENSOR_INTERVAL_SECONDS` (default 30), `D1SYNC_LAG_THRESHOLD_SECONDS`
    (default 300), `D1SYNC_BATCH_SIZE` (default 2000), `D1SYNC_RECONCILE_CRON` (default `0 3 * * *`).
    """
    schema = load_schema(schema_file or config.schema_path())
    tables = build_table_assets(schema, options=ApplyOptions(batch_size=int(config.number("D1SYNC_BATCH_SIZE", 2000))))
    checks = build_table_checks(schema, lag_threshold_seconds=config.number("D1SYNC_LAG_THRESHOLD_SECONDS", 300))
    drift = build_reconcile_checks(schema)
    # The apply job runs the cheap checks after each materialization, never the full comparison.
    apply_job = dg.define_asset_job(
        APPLY_JOB,
        selection=dg.AssetSelection.groups(GROUP).without_checks() | dg.AssetSelection.checks(checks),
        description="Apply queued changes to every D1 table.",
    )
    reconcile_job = dg.define_asset_job(
        "d1sync_reconcile",
        selection=dg.AssetSelection.checks(drift),
        description="Full comparison of every table with Postgres; repairs drift through the queue (config: repair).",
    )
    backfill_job = build_backfill_job(schema)
    nuke_job = build_nuke_job(schema, allow_destructive=config.allow_destructive())
    sensor = build_depth_sensor(
        apply_job,
        interval_seconds=int(config.number("D1SYNC_SENSOR_INTERVAL_SECONDS", 30)),
        consumers=[backfill_job.name, nuke_job.name, reconcile_job.name],
        asset_keys=[asset_key(t) for t in schema.tables],
    )
    schedule = dg.ScheduleDefinition(
        name="d1sync_reconcile_schedule",
        job=reconcile_job,
        cron_schedule=os.environ.get("D1SYNC_RECONCILE_CRON") or "0 3 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Full reconciliation of every table (compare and repair), daily by default.",
    )
    return dg.Definitions(
        assets=[*(source_spec(t) for t in schema.tables), tables],
        asset_checks=[checks, drift],
        sensors=[sensor],
        schedules=[schedule],
        jobs=[
            apply_job,
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
