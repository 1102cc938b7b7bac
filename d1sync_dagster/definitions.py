"""Builds one `Definitions` from `schema.json`; `workspace.yaml` loads `defs` from here.

Secrets are wired as `dg.EnvVar`, so they are read when a run uses a resource and never stored in run
config. The D1 backend is the HTTP API when the `CLOUDFLARE_*` variables are set (all three, as
`config.d1_settings` checks), else the local SQLite file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import dagster as dg

from d1sync_dagster import config
from d1sync_dagster.defs.assets import build_table_assets, source_spec
from d1sync_dagster.defs.checks import all_cheap_check_keys, build_reconcile_checks, build_source_checks
from d1sync_dagster.defs.jobs import build_backfill_job, build_doctor_job, build_nuke_job, build_setup_job
from d1sync_dagster.defs.keys import Wiring
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.defs.sensors import build_depth_sensor
from d1sync_dagster.defs.stream import build_stream_job
from d1sync_dagster.engine.apply import ApplyOptions
from d1sync_dagster.engine.stream import StreamOptions
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import Schema, load_schema
from d1sync_dagster.targets import Target, load_targets

# Dagster copies a sensor when it binds its jobs (`SensorDefinition.with_attributes`) and passes the copy
# `owners=[]`, which its beta marker takes for the beta parameter being used: a BetaWarning on every load of
# the code location, though d1sync sets no sensor owners. Only that warning is silenced.
warnings.filterwarnings(
    "ignore", message=r"Parameter `owners` of initializer `SensorDefinition\.__init__`", category=dg.BetaWarning
)

APPLY_JOB = "d1sync_apply"


def build_d1_resource(target: Target | None = None) -> D1Resource:
    """The D1 resource of a target of a targets file or, for the single target of today's variables (or
    none), of the backend `config.d1_settings` chose and validated (all three Cloudflare variables or
    none). The ids and the token reach the resource as `dg.EnvVar`, read when a run uses it."""
    shards = target.shards_json() if target is not None else None
    if target is not None and target.local_path:
        return D1Resource(local_path=target.local_path, shards_json=shards)
    if target is not None and target.account_id_env:
        names = (target.account_id_env, target.database_id_env or "", target.api_token_env or "")
    else:
        settings = config.d1_settings()
        if settings.backend != "http":
            return D1Resource(local_path=settings.local_path)
        names = config.CLOUDFLARE_VARS
    account, database, token = (dg.EnvVar(v) for v in names)
    return D1Resource(
        account_id=account,
        database_id=database,
        api_token=token,
        base_url=os.environ.get("CLOUDFLARE_API_BASE_URL") or D1Resource.model_fields["base_url"].default,
        attempts=config.attempts(),
        shards_json=shards,
    )


def build_definitions(
    schema_file: str | None = None,
    *,
    targets_file: str | None = None,
    prefix: Sequence[str] = (),
    resource_keys: tuple[str, str] | None = None,
) -> dg.Definitions:
    """All d1sync definitions for one `schema.json`, for each target of `targets_file` (default
    `D1SYNC_TARGETS`; without one, the single target of today's variables).

    `prefix` goes before every asset key and `resource_keys` names the (Postgres, D1) resources of a single
    target, so that an instance lives next to a user's own assets (see `components.py`). Destructive jobs
    are disabled unless `D1SYNC_ALLOW_DESTRUCTIVE=1` (see `defs/guard.py`).
    Tunables from the environment: `D1SYNC_APPLY_MODE` (`stream`, the default: the sensor keeps one
    `d1sync_stream` run alive; `run`: the sensor starts a short `d1sync_apply` run when changes wait),
    `D1SYNC_STREAM_SECONDS` (default 900, how long a streaming run lasts),
    `D1SYNC_SENSOR_INTERVAL_SECONDS` (default 5 streaming, 30 per run), `D1SYNC_LAG_THRESHOLD_SECONDS`
    (default 300), `D1SYNC_BATCH_SIZE` (default 2000), `D1SYNC_RECONCILE_CRON` (default `0 3 * * *`).
    """
    schema = load_schema(schema_file or config.schema_path())
    targets = load_targets(schema, targets_file)
    several = len(targets) > 1
    if several and resource_keys is not None:
        raise ConfigError("resource_keys names the resources of one target; with several, each gets its own")
    parts: list[dg.Definitions] = []
    sources: dict[dg.AssetKey, dg.AssetSpec] = {}
    for target in targets:
        if several:
            pg_key, d1_key = f"postgres_{target.name}", f"d1_{target.name}"
        else:
            pg_key, d1_key = resource_keys or ("postgres", "d1")
        wiring = Wiring(
            target=target.name if several else None, postgres_key=pg_key, d1_key=d1_key, prefix=tuple(prefix)
        )
        part = target.schema(schema)
        for t in part.tables:  # one source asset per Postgres table, whatever targets it feeds
            sources.setdefault(wiring.source_key(t), source_spec(t, wiring))
        parts.append(_target_definitions(part, target, wiring))
    return dg.Definitions.merge(
        dg.Definitions(
            assets=list(sources.values()),
            # Every job runs its steps in the run worker: the multiprocess default starts a Python process
            # per step (about 5 s each on a small machine), which made a sensor-started apply take 9-24 s for
            # well under a second of work.
            executor=dg.in_process_executor,
        ),
        *parts,
    )


def _tables_job(
    name: str, schema: Schema, tables: list[str], wiring: Wiring, description: str
) -> dg.UnresolvedAssetJobDefinition:
    """An asset job of the D1 tables `tables` with their cheap checks, never the full comparison (one
    partitioning: all sharded or none)."""
    return dg.define_asset_job(
        name,
        selection=dg.AssetSelection.assets(*(wiring.asset_key(schema.table(n)) for n in tables)).without_checks()
        | dg.AssetSelection.checks(*all_cheap_check_keys(schema, tables, wiring=wiring)),
        description=description,
    )


def _target_definitions(schema: Schema, target: Target, wiring: Wiring) -> dg.Definitions:
    """One target's assets, checks, jobs, sensor, schedule and resources."""
    lag_threshold = config.number("D1SYNC_LAG_THRESHOLD_SECONDS", 300)
    allow_destructive = config.allow_destructive()
    apply_options = ApplyOptions(
        batch_size=int(config.number("D1SYNC_BATCH_SIZE", 2000)), planner_process=config.planner_process()
    )
    # Sharded tables: their assets are partitioned by shard database (a partition per shard).
    sharded = {r.table: tuple(r.shards) for r in target.rules} if target.shards else {}
    tables = build_table_assets(
        schema,
        options=apply_options,
        lag_threshold_seconds=lag_threshold,
        allow_destructive=allow_destructive,
        wiring=wiring,
        shards=[name for name, _ in target.shards],
        sharded=sharded,
    )
    reconcile_cron = os.environ.get("D1SYNC_RECONCILE_CRON") or "0 3 * * *"
    drift = build_reconcile_checks(schema, cron=reconcile_cron, wiring=wiring)
    where = f" of target {target.name}" if wiring.target else ""
    # The apply job runs the cheap checks in the same step as the apply, never the full comparison. A job's
    # assets share one partitioning: the apply job selects the unsharded tables, and the sharded ones
    # (partitioned by shard) have jobs of their own. Every apply drains the whole queue and records what it
    # applied to any table, a sharded one's per shard reached.
    plain = [t.name for t in schema.tables if t.name not in sharded]
    apply_job = _tables_job(
        wiring.name(APPLY_JOB),
        schema,
        plain or list(sharded),
        wiring,
        f"Apply queued changes to every D1 table{where}, then run each table's checks"
        + (" (the sharded tables' changes too, recorded per shard)." if sharded and plain else "."),
    )
    shard_jobs, apply_shards_job = [], None
    if sharded:
        shard_jobs.append(
            _tables_job(
                wiring.name("d1sync_backfill_shards"),
                schema,
                list(sharded),
                wiring,
                f"The sharded tables{where}, a partition per shard database: Launch backfill (pick the shards) "
                "backfills each shard in a run of its own, and the partitions show each shard's status.",
            )
        )
    if sharded and plain:  # the sensor's run when only sharded tables have changes waiting
        apply_shards_job = _tables_job(
            wiring.name("d1sync_apply_shards"),
            schema,
            list(sharded),
            wiring,
            f"Apply queued changes{where} (every table's), recording the sharded tables per shard reached. "
            "Launched with a partition, it backfills that shard instead.",
        )
        shard_jobs.append(apply_shards_job)
    reconcile_job = dg.define_asset_job(
        wiring.name("d1sync_reconcile"),
        selection=dg.AssetSelection.checks(drift),
        description=(
            f"Full comparison of every table{where} with Postgres; repairs drift through the queue (config: repair)."
        ),
    )
    backfill_job = build_backfill_job(schema, wiring)
    nuke_job = build_nuke_job(
        schema, allow_destructive=allow_destructive, lag_threshold_seconds=lag_threshold, wiring=wiring
    )
    stream_job = build_stream_job(
        schema,
        options=apply_options,
        defaults=StreamOptions(seconds=config.number("D1SYNC_STREAM_SECONDS", 900)),
        lag_threshold_seconds=lag_threshold,
        wiring=wiring,
        sharded=set(sharded),
    )
    streaming = config.apply_mode() == "stream"
    sensor = build_depth_sensor(
        apply_job,
        shard_job=apply_shards_job,
        sharded_tables=set(sharded),
        stream_job=stream_job if streaming else None,
        # Streaming, the sensor only watches over the runs (two cheap queries a tick): every 5 s, so that a
        # stream whose whole process group died is replaced within seconds. Per run, each tick may start a run.
        interval_seconds=int(config.number("D1SYNC_SENSOR_INTERVAL_SECONDS", 5 if streaming else 30)),
        consumers=[
            backfill_job.name,
            nuke_job.name,
            reconcile_job.name,
            stream_job.name,
            *(j.name for j in shard_jobs),
        ],
        asset_keys=[wiring.asset_key(t) for t in schema.tables],
        table_keys={t.name: wiring.asset_key(t) for t in schema.tables},
        lag_threshold_seconds=lag_threshold,
        # A sensor run records a materialization only for the tables its changes reached.
        run_config={"ops": {tables.node_def.name: {"config": {"record_unchanged": False}}}},
        wiring=wiring,
    )
    schedule = dg.ScheduleDefinition(
        name=wiring.name("d1sync_reconcile_schedule"),
        job=reconcile_job,
        cron_schedule=reconcile_cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Full reconciliation of every table{where} (compare and repair), daily by default.",
    )
    return dg.Definitions(
        assets=[tables],
        asset_checks=[drift, build_source_checks(schema, wiring=wiring)],
        sensors=[sensor],
        schedules=[schedule],
        jobs=[
            apply_job,
            stream_job,
            build_setup_job(schema, wiring),
            build_doctor_job(schema, wiring),
            backfill_job,
            nuke_job,
            reconcile_job,
            *shard_jobs,
        ],
        resources={
            wiring.postgres_key: PostgresResource(database_url=dg.EnvVar("DATABASE_URL"), queue=target.queue),
            wiring.d1_key: build_d1_resource(target),
        },
    )


defs = build_definitions()
