"""`pgmq_depth_sensor`: requests an apply run when the queue has work and no apply run is in flight."""

import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from d1sync_dagster.defs.resources import NOT_BEFORE_TAG, PostgresResource

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def build_depth_sensor(job: Any, *, interval_seconds: int = 30) -> dg.SensorDefinition:
    """The sensor's cursor is the newest msg_id it has seen; skip reasons say depth and oldest age."""

    @dg.sensor(
        name="pgmq_depth_sensor",
        job=job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Watches the PGMQ change queue (pgmq.metrics) and starts an apply run when changes are waiting and no "
            f"apply run is queued or running. Checks every {interval_seconds}s."
        ),
    )
    def pgmq_depth_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource):
        with postgres.get_client() as pg:
            m = pg.metrics()
        newest = m.total_messages
        context.update_cursor(str(newest))
        if m.queue_length == 0:
            return dg.SkipReason(f"queue {m.queue_name} is empty (newest msg_id {newest})")
        latest = context.instance.get_run_records(dg.RunsFilter(job_name=job.name), limit=1)
        not_before = latest[0].dagster_run.tags.get(NOT_BEFORE_TAG) if latest else None
        if not_before and datetime.fromisoformat(not_before) > datetime.now(UTC):
            return dg.SkipReason(
                f"{m.queue_length} changes waiting, but the D1 API's request budget is spent until {not_before} "
                f"(run {latest[0].dagster_run.run_id})"
            )
        in_flight = context.instance.get_run_records(dg.RunsFilter(job_name=job.name, statuses=IN_FLIGHT), limit=1)
        if in_flight:
            return dg.SkipReason(
                f"{m.queue_length} changes waiting (oldest {m.oldest_msg_age_sec}s) but apply run "
                f"{in_flight[0].dagster_run.run_id} is still in flight"
            )
        return dg.RunRequest(
            run_key=f"apply-{newest}-{int(time.time())}",
            tags={"d1sync/queue_depth": str(m.queue_length), "d1sync/oldest_age_seconds": str(m.oldest_msg_age_sec)},
        )

    return pgmq_depth_sensor
