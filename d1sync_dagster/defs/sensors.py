"""`pgmq_depth_sensor`: keeps one streaming apply run alive (`d1sync_stream`, the default), or, in per-run
mode (`D1SYNC_APPLY_MODE=run`), requests an apply run when the queue has work and nothing else consumes it.

It never starts a run that could only find the queue taken: it skips, saying why, while any run that
consumes the queue is queued or running (an apply, a backfill, a nuke, a reconcile, a UI materialization or
check of the D1 assets), or while anyone holds the single-consumer lock (a CLI apply, a backfill from a
shell: pid, application name and since when are named). Its cursor is the newest msg_id it has seen, so a
skip can say how many changes arrived since the last tick. Runs carry no `run_key`: whether a run is due
depends on what is in flight, which a key cannot express (a failed run's key would block its retry).
"""

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from d1sync_dagster.clients.pgmq import describe_holders
from d1sync_dagster.defs.keys import DEFAULT, Wiring
from d1sync_dagster.defs.resources import NOT_BEFORE_TAG
from d1sync_dagster.defs.stream import ENDS_AT_TAG

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


#: Up to this many queued changes, an apply run selects only the tables they name.
SELECT_LIMIT = 10_000

#: How often `dagster-daemon` evaluates sensors (`MIN_INTERVAL_LOOP_TIME` of its sensor loop).
DAEMON_LOOP_SECONDS = 5


def tick_spacing(interval_seconds: int) -> int:
    """The sensor's `minimum_interval_seconds` for a tick every `interval_seconds`. The daemon looks at
    sensors every 5 s and ticks one whose minimum interval has passed since its last tick; set to the
    interval itself, a loop that comes a moment early skips the tick, and a 5 s sensor ticks every 10 s
    about half the time (seen in the daemon soak: per-run lag p99 9.5-10.6 s). A second less lets every
    loop on the interval tick (the interval counts in the daemon's 5 s steps)."""
    return max(1, interval_seconds - 1)


def consuming_run(run: dg.DagsterRun, consumers: Collection[str], asset_keys: Collection[dg.AssetKey]) -> bool:
    """Whether `run` reads or writes the queue: one of the `consumers` jobs, or a run (from the UI, an asset
    job, a backfill of assets) that materializes or checks any of the D1 assets."""
    if run.job_name in consumers:
        return True
    if run.asset_selection and any(k in asset_keys for k in run.asset_selection):
        return True
    return bool(run.asset_check_selection and any(c.asset_key in asset_keys for c in run.asset_check_selection))


def build_depth_sensor(
    job: Any,
    *,
    interval_seconds: int = 30,
    consumers: Collection[str] = (),
    asset_keys: Collection[dg.AssetKey] = (),
    run_config: dict[str, Any] | None = None,
    stream_job: Any = None,
    wiring: Wiring = DEFAULT,
    handover_seconds: float | None = None,
    table_keys: Mapping[str, dg.AssetKey] | None = None,
) -> dg.SensorDefinition:
    """The sensor for `job` (the apply job); `consumers` names the other jobs that take the queue;
    `run_config` is the config of the runs it requests. With a `stream_job` it keeps one streaming run
    alive instead (started whether or not changes are waiting), and requests no apply runs. With
    `table_keys` (table name -> D1 asset), an apply run selects only the tables with queued changes, so its
    Dagster events grow with the tables that changed, not with schema.json (past `SELECT_LIMIT` queued
    changes it selects every table)."""
    # A streaming run's successor is requested when its predecessor has at most this long left: enough
    # for two ticks and a run's start-up; it waits for the lock (StreamConfig.wait_for_lock_seconds).
    handover = handover_seconds if handover_seconds is not None else 2 * interval_seconds + 60
    consumer_jobs = {job.name, *consumers} | ({stream_job.name} if stream_job is not None else set())
    keys = set(asset_keys)
    jobs = [job] if stream_job is None else [stream_job]
    what = (
        "starts an apply run when changes are waiting"
        if stream_job is None
        else (
            f"keeps one {stream_job.name} run alive (it follows the queue and ends by itself; the next tick starts "
            "the next one)"
        )
    )

    @dg.sensor(
        name=wiring.name("pgmq_depth_sensor"),
        jobs=jobs,
        required_resource_keys={wiring.postgres_key},
        minimum_interval_seconds=tick_spacing(interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Watches the PGMQ change queue (pgmq.metrics) and {what}, "
            "unless a run that consumes the queue (apply, backfill, nuke, reconcile, a materialization of the D1 "
            f"assets) is queued or running or another consumer holds the queue's lock. Checks every "
            f"{interval_seconds}s; the skip reason says why no run started."
        ),
    )
    def pgmq_depth_sensor(context: dg.SensorEvaluationContext):
        postgres = getattr(context.resources, wiring.postgres_key)
        with postgres.get_client() as pg:
            m = pg.metrics()
            holders = pg.lock_holders() if m.queue_length or stream_job is not None else []
            selection = None
            if stream_job is None and table_keys and 0 < m.queue_length <= SELECT_LIMIT:
                named = pg.queued_tables(SELECT_LIMIT)
                selection = [k for name, k in table_keys.items() if name in named] or None
        newest = m.total_messages
        seen = int(context.cursor) if context.cursor and context.cursor.isdigit() else None
        context.update_cursor(str(newest))
        arrived = "" if seen is None else f"; {max(newest - seen, 0)} new since the last tick"
        if m.queue_length == 0 and stream_job is None:
            return dg.SkipReason(f"queue {m.queue_name} is empty (newest msg_id {newest}{arrived})")
        age = m.oldest_msg_age_sec
        details = [d for d in ("" if age is None else f"oldest {age}s", arrived.removeprefix("; ")) if d]
        waiting = f"{m.queue_length} changes waiting" + (f" ({'; '.join(details)})" if details else "")
        in_flight = context.instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT), limit=100)
        busy = [r.dagster_run for r in in_flight if consuming_run(r.dagster_run, consumer_jobs, keys)]
        streaming = [r for r in busy if stream_job is not None and r.job_name == stream_job.name]
        successor_of = None
        # A streaming run tags its end once it holds the lock: one without the tag is still starting or
        # waiting to take over; of those with it, the newest follows the queue (an older one is finishing).
        starting = [r for r in streaming if ENDS_AT_TAG not in r.tags]
        following = [r for r in streaming if ENDS_AT_TAG in r.tags]
        if starting and following:
            return dg.SkipReason(
                f"{waiting}; run {following[0].run_id} follows the queue and run {starting[0].run_id} waits to "
                "take over from it"
            )
        if streaming:
            run = (following or starting)[0]
            ends_at = run.tags.get(ENDS_AT_TAG)
            left = (datetime.fromisoformat(ends_at) - datetime.now(UTC)).total_seconds() if ends_at else None
            if left is None or left > handover:
                until = f" until {ends_at}" if ends_at else ""
                return dg.SkipReason(
                    f"{waiting}; run {run.run_id} ({run.job_name}, {run.status.value.lower()}) follows the queue{until}"
                )
            successor_of = run.run_id  # its time is nearly up: start the next, which takes over when it ends
            busy = [r for r in busy if r not in streaming]
        if busy:
            run = busy[0]
            return dg.SkipReason(
                f"{waiting}, but run {run.run_id} ({run.job_name}, {run.status.value.lower()}) consumes the queue"
            )
        if holders and successor_of is None:  # (a successor expects its predecessor to hold it)
            return dg.SkipReason(f"{waiting}, but the queue's consumer lock is held by {describe_holders(holders)}")
        launched = job if stream_job is None else stream_job
        latest = context.instance.get_run_records(dg.RunsFilter(job_name=launched.name), limit=1)
        not_before = latest[0].dagster_run.tags.get(NOT_BEFORE_TAG) if latest else None
        if not_before and datetime.fromisoformat(not_before) > datetime.now(UTC):
            return dg.SkipReason(
                f"{waiting}, but the D1 API's request budget is spent until {not_before} "
                f"(run {latest[0].dagster_run.run_id})"
            )
        return dg.RunRequest(
            job_name=launched.name,
            asset_selection=selection,
            run_config=run_config if stream_job is None and run_config else {},
            tags=({"d1sync/successor_of": successor_of} if successor_of else {})
            | {
                "d1sync/queue_depth": str(m.queue_length),
                "d1sync/oldest_age_seconds": str(m.oldest_msg_age_sec),
                "d1sync/newest_msg_id": str(newest),
            },
        )

    return pgmq_depth_sensor
