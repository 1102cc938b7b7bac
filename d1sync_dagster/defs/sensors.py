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

from d1sync_dagster.clients.pgmq import QueueMetrics, describe_holders
from d1sync_dagster.defs.checks import LAG
from d1sync_dagster.defs.keys import DEFAULT, Wiring
from d1sync_dagster.defs.resources import NOT_BEFORE_TAG
from d1sync_dagster.defs.stream import ENDS_AT_TAG, STOPPING_TAG

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


#: The sensor fails the lag checks of a stale queue at most this often (each is a row in the event log).
ALERT_EVERY_SECONDS = 60.0

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


#: A started streaming run takes the standby lock (or the consumer lock) within seconds of its start (its
#: resources, the schema check, the notification probe); one that holds neither this long after is gone.
STANDBY_GRACE_SECONDS = 30.0
#: A streaming run that still has not finished this long after its end is given up.
STUCK_SECONDS = 300.0


def holder_run_ids(holders: Collection[tuple[int, str, Any]]) -> set[str] | None:
    """The run ids (their first 8 characters, which the application name has room for) named by the lock's
    holders (`PgmqClient.holder_label`), or None when a holder's application name cannot be read (another
    role's session): who holds it is then unknown."""
    out = set()
    for _pid, app, _since in holders:
        if not app:
            return None
        if "[run " in app and "]" in app:
            out.add(app.split("[run ", 1)[1].split("]", 1)[0])
    return out


def dead_stream_runs(
    streaming: list[dg.DagsterRun],
    records: Mapping[str, Any],
    holders: Collection[tuple[int, str, Any]],
    standbys: Collection[tuple[int, str, Any]],
    now: datetime,
    start_timeout: float,
) -> list[tuple[dg.DagsterRun, str]]:
    """The streaming runs that claim to be in flight but are not, and why:
    - one that tagged its end (so it took the lock) and should still follow the queue, while the lock is
      held by nobody, or by others only;
    - one still in flight long after its end (`STUCK_SECONDS`);
    - one without that tag that neither stands by (holds the standby lock) nor holds the consumer lock,
      `STANDBY_GRACE_SECONDS` after it started (it died waiting) or `start_timeout` seconds after it was
      made (it never started)."""
    holding = holder_run_ids(holders)
    alive = holder_run_ids([*holders, *standbys])
    out = []
    for run in streaming:
        ends_at = run.tags.get(ENDS_AT_TAG)
        if ends_at is not None:
            ends = datetime.fromisoformat(ends_at)
            if (now - ends).total_seconds() > STUCK_SECONDS:
                out.append((run, f"it should have ended at {ends_at} and is still {run.status.value.lower()}"))
            elif STOPPING_TAG in run.tags or now >= ends:
                continue  # ending (on time, or stopped): it lets go of the lock first, then finishes
            elif not holders or (holding is not None and run.run_id[:8] not in holding):
                who = describe_holders(holders) if holders else "nobody"
                out.append((run, f"it should follow the queue until {ends_at}, but the consumer lock is held by {who}"))
        else:
            record = records.get(run.run_id)
            made = getattr(record, "create_timestamp", None)
            began = getattr(record, "start_time", None)  # (epoch seconds) a STARTED run stands by within seconds
            late = made is not None and (now - made.astimezone(UTC)).total_seconds() > start_timeout
            if run.status == dg.DagsterRunStatus.STARTED and began is not None:
                late = now.timestamp() - began > STANDBY_GRACE_SECONDS
            if not late or (alive is None and (holders or standbys)) or (alive and run.run_id[:8] in alive):
                continue
            if run.status == dg.DagsterRunStatus.STARTED:
                out.append((run, "it neither stands by for the consumer lock nor holds it (its process is gone)"))
            else:
                out.append((run, f"it did not start within {start_timeout:g}s ({run.status.value.lower()})"))
    return out


def build_depth_sensor(
    job: Any,
    *,
    interval_seconds: int = 30,
    consumers: Collection[str] = (),
    asset_keys: Collection[dg.AssetKey] = (),
    run_config: dict[str, Any] | None = None,
    stream_job: Any = None,
    wiring: Wiring = DEFAULT,
    start_timeout_seconds: float = 120.0,
    table_keys: Mapping[str, dg.AssetKey] | None = None,
    lag_threshold_seconds: float | None = None,
    shard_job: Any = None,
    sharded_tables: Collection[str] = (),
) -> dg.SensorDefinition:
    """The sensor for `job` (the apply job); `consumers` names the other jobs that take the queue;
    `run_config` is the config of the runs it requests. With a `stream_job` it keeps one streaming run
    alive instead (started whether or not changes are waiting), and requests no apply runs. With
    `table_keys` (table name -> D1 asset), an apply run selects only the tables with queued changes, so its
    Dagster events grow with the tables that changed, not with schema.json (past `SELECT_LIMIT` queued
    changes it selects every table). With `lag_threshold_seconds` too, streaming, it fails the lag checks of
    the tables with changes waiting past the threshold while nothing applies them. `sharded_tables` are not
    in `job` (their assets are partitioned by shard): when only they have changes waiting, the run is one of
    `shard_job`, which selects them."""
    start_timeout = start_timeout_seconds
    consumer_jobs = {job.name, *consumers} | ({stream_job.name} if stream_job is not None else set())
    consumer_jobs |= {shard_job.name} if shard_job is not None else set()
    keys = set(asset_keys)
    jobs = ([job] if shard_job is None else [job, shard_job]) if stream_job is None else [stream_job]
    apart = set(sharded_tables) if shard_job is not None else set()
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
        previous = (context.cursor or "").split(";")
        alerted = float(previous[1]) if len(previous) > 1 and previous[1].replace(".", "").isdigit() else 0.0
        now = datetime.now(UTC).timestamp()
        # Staleness shows while nothing applies: past the lag threshold, the sensor fails the tables' lag
        # checks itself (once a minute at most), whoever should have applied the queue; the next record of
        # a run that applies it passes them again.
        alerting = stream_job is not None and bool(table_keys) and lag_threshold_seconds is not None
        with getattr(context.resources, wiring.postgres_key).get_client() as pg:
            m = pg.metrics()
            holders = pg.lock_holders() if m.queue_length or stream_job is not None else []
            standbys = pg.lock_holders(standby=True) if stream_job is not None else []
            selection = stale = None
            run_job = job
            if stream_job is None and table_keys and 0 < m.queue_length <= SELECT_LIMIT:
                named = pg.queued_tables(SELECT_LIMIT)
                selection = [k for name, k in table_keys.items() if name in named and name not in apart] or None
                if selection is None and apart & set(named):  # only sharded tables have changes waiting
                    run_job = shard_job
                    selection = [k for name, k in table_keys.items() if name in named and name in apart]
            age = m.oldest_msg_age_sec
            if alerting and now - alerted >= ALERT_EVERY_SECONDS and age is not None and age > lag_threshold_seconds:
                stale = pg.queued_tables(SELECT_LIMIT)
        decision = decide(context, m, holders, standbys, selection, run_job)
        if not alerting:
            return decision
        if stale is None:
            if len(previous) > 1 and now - alerted < ALERT_EVERY_SECONDS:
                context.update_cursor(f"{context.cursor};{previous[1]}")
            return decision
        events = [
            dg.AssetCheckEvaluation(
                asset_key=key,
                check_name=LAG,
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=(
                    f"evaluated by {wiring.name('pgmq_depth_sensor')}: the oldest change waiting is {age}s old and "
                    "nothing has applied it (the streaming run is down, or cannot take the queue)"
                ),
                metadata={"oldest_waiting_seconds": float(age or 0), "threshold_seconds": lag_threshold_seconds},
            )
            for name, key in (table_keys or {}).items()
            if name in stale or m.queue_length > SELECT_LIMIT
        ]
        context.update_cursor(f"{context.cursor};{now:.0f}")
        if isinstance(decision, dg.RunRequest):
            return dg.SensorResult(run_requests=[decision], asset_events=events)
        return dg.SensorResult(skip_reason=decision, asset_events=events)

    def decide(
        context: dg.SensorEvaluationContext,
        m: QueueMetrics,
        holders: list[tuple[int, str, Any]],
        standbys: list[tuple[int, str, Any]],
        selection: list[dg.AssetKey] | None,
        run_job: Any,
    ) -> dg.RunRequest | dg.SkipReason:
        """What this tick does, from what was read in Postgres."""
        newest = m.total_messages
        head = (context.cursor or "").split(";")[0]
        seen = int(head) if head.isdigit() else None
        context.update_cursor(str(newest))
        arrived = "" if seen is None else f"; {max(newest - seen, 0)} new since the last tick"
        if m.queue_length == 0 and stream_job is None:
            return dg.SkipReason(f"queue {m.queue_name} is empty (newest msg_id {newest}{arrived})")
        age = m.oldest_msg_age_sec
        details = [d for d in ("" if age is None else f"oldest {age}s", arrived.removeprefix("; ")) if d]
        waiting = f"{m.queue_length} changes waiting" + (f" ({'; '.join(details)})" if details else "")
        in_flight = context.instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT), limit=100)
        records = {r.dagster_run.run_id: r for r in in_flight}
        busy = [r.dagster_run for r in in_flight if consuming_run(r.dagster_run, consumer_jobs, keys)]
        streaming = [r for r in busy if stream_job is not None and r.job_name == stream_job.name]
        successor_of = None
        if streaming:
            # The consumer lock is the truth, not the run statuses: a run killed with its process (kill -9,
            # an OOM kill, a host crash) stays STARTED, and one that never starts stays NOT_STARTED.
            for run, why in dead_stream_runs(streaming, records, holders, standbys, datetime.now(UTC), start_timeout):
                context.instance.report_run_failed(run, message=f"d1sync: {why}; the sensor gave it up")
                context.log.warning(f"run {run.run_id} given up: {why}")
                streaming.remove(run)
                busy.remove(run)
        # A streaming run tags its end once it holds the lock: one without the tag is the standby, waiting
        # for the lock; of those with it, the newest follows the queue (an older one is finishing).
        starting = [r for r in streaming if ENDS_AT_TAG not in r.tags]
        following = [r for r in streaming if ENDS_AT_TAG in r.tags]
        if starting:
            run = (following or starting)[0]
            doing = f"run {following[0].run_id} follows the queue and " if following else ""
            return dg.SkipReason(f"{waiting}; {doing}run {starting[0].run_id} stands by to take over the queue")
        if following:
            # A standby: it waits for the consumer lock and takes over the moment the running one lets go,
            # whether it ends on time or dies (its connection, and the lock with it, go at once).
            successor_of = following[0].run_id
            busy = [r for r in busy if r not in streaming]
        if busy:
            run = busy[0]
            return dg.SkipReason(
                f"{waiting}, but run {run.run_id} ({run.job_name}, {run.status.value.lower()}) consumes the queue"
            )
        if holders and successor_of is None:  # (a standby expects the running one to hold it)
            return dg.SkipReason(f"{waiting}, but the queue's consumer lock is held by {describe_holders(holders)}")
        launched = run_job if stream_job is None else stream_job
        # The D1 API's budget is the account's: the latest run of any job this sensor starts may have found it
        # spent.
        for launches in jobs:
            latest = context.instance.get_run_records(dg.RunsFilter(job_name=launches.name), limit=1)
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
