"""`d1sync_stream`: the streaming apply as a Dagster run. It follows the queue for `seconds` (applying each
change within a fraction of a second of its commit), records a materialization of `d1/<table>` for each
table that changed, at most every `record_every_seconds` (60 s by default, the figures summed), with the
table's checks on the rows those changes touched and an observation of its Postgres source; the tables no
change reached get their checks when it ends. It ends by itself so that a code reload takes effect. The
sensor keeps one such run alive."""

import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.changes import Key
from d1sync_dagster.defs.assets import recorded as recorded_events
from d1sync_dagster.defs.assets import run_figures, source_observations, table_metadata
from d1sync_dagster.defs.checks import all_cheap_check_keys, source_outcomes, table_outcomes
from d1sync_dagster.defs.keys import DEFAULT, Wiring
from d1sync_dagster.defs.resources import open_clients
from d1sync_dagster.engine.apply import ApplyOptions
from d1sync_dagster.engine.health import ChangedKeys, TableHealth, table_health
from d1sync_dagster.engine.reports import ApplyReport, add_shards
from d1sync_dagster.engine.setup import ensure_schema
from d1sync_dagster.engine.stream import Landed, StreamOptions, follow_queue
from d1sync_dagster.errors import D1Error, QueueError
from d1sync_dagster.schema import Schema

STREAM_JOB = "d1sync_stream"
#: Run tag of a streaming run: when (UTC, ISO) it stops following the queue. The sensor starts its
#: successor shortly before, which waits for the lock and takes over the moment it is released.
ENDS_AT_TAG = "d1sync/ends_at"
#: Run tag a streaming run sets when it is stopped (Ctrl-C, SIGTERM) and lets go of the lock.
STOPPING_TAG = "d1sync/stopping"


class StreamConfig(dg.Config):
    seconds: float = Field(default=900.0, description="how long the run follows the queue before it ends by itself")
    poll_seconds: float = Field(
        default=1.0, description="how often an idle run looks at the queue without a notification (pooler: always)"
    )
    record_every_seconds: float = Field(
        default=60.0,
        description=(
            "a changed table records a materialization (the figures summed since its last), its checks and its "
            "source's observation at most this often: the event log grows with this, not with the changes"
        ),
    )
    wait_for_lock_seconds: float = Field(
        default=3600.0,
        description=(
            "while another consumer holds the queue (the run this one stands by for), wait this long to take over"
        ),
    )


def _checked(
    context: dg.OpExecutionContext,
    checker: PgmqClient,
    client: D1Client,
    schema: Schema,
    names: list[str],
    keys: dict[str, list[Key]],
) -> dict[str, TableHealth]:
    """The recorded tables' health, read beside the apply. A transient failure (a terminated connection, a
    moment of D1) leaves this record without its checks, said in the log, and the run goes on: the next
    record has them."""
    try:
        return table_health(checker, client, schema, hold_lock=False, tables=names, keys=keys)
    except (QueueError, D1Error) as e:
        context.log.warning(f"the checks of this record could not be read ({e}); the next record's will be")
        try:
            checker.reconnect()
        except QueueError:
            pass
        return {}


@contextmanager
def _stop_on_signals(halt: threading.Event, stopping: Callable[[], None]) -> Iterator[None]:
    """While the run follows the queue, SIGTERM (a pod eviction, Dagster stopping the run worker) and SIGINT
    (Ctrl-C) ask it to stop after the batch in hand, instead of Dagster's interruption, which can land
    between two of the run's events and then fails the run. `stopping` tags the run first, so that the
    sensor does not take it for dead once it lets go of the lock. Only where signals can be handled (the
    main thread); elsewhere Dagster's own handling stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(_sig: int, _frame: object) -> None:
        if not halt.is_set():
            stopping()
            halt.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stream_figures(totals: ApplyReport, since: float | None) -> dict[str, float]:
    """The run's figures so far (`run_figures`), with its duration and rate counted from when it took the
    lock (the report's own are set only when the run ends)."""
    figures = run_figures(totals)
    if since is not None and not totals.duration_seconds:
        seconds = max(time.time() - since, 1e-9)
        figures["duration_seconds"] = seconds
        figures["changes_per_second"] = totals.messages / seconds
    return figures


def build_stream_job(
    schema: Schema,
    *,
    options: ApplyOptions | None = None,
    defaults: StreamOptions | None = None,
    lag_threshold_seconds: float = 300.0,
    wiring: Wiring = DEFAULT,
    sharded: Collection[str] = (),
) -> dg.JobDefinition:
    """`d1sync_stream`: one run follows the queue. A sharded table (`sharded`, its asset partitioned by shard)
    is recorded per shard database its changes reached."""
    default = defaults or StreamOptions()
    op_name = wiring.name("d1sync_stream_op")

    # No concurrency pool: the streaming run is the standing consumer (the consumer lock arbitrates), and
    # a pool slot held for its whole run would keep a backfill or a UI materialization waiting that long.
    @dg.op(
        name=op_name,
        description="Follow the queue and apply each change as it commits; ends after `seconds`.",
        required_resource_keys=wiring.resource_keys,
    )
    def stream_op(context: dg.OpExecutionContext, config: StreamConfig):
        postgres, d1 = wiring.resources(context)
        stream = StreamOptions(
            config.seconds, config.poll_seconds, config.record_every_seconds, config.wait_for_lock_seconds
        )
        final: Landed | None = None
        changed = ChangedKeys(schema)
        options_here = replace(
            options or ApplyOptions(), on_batch_messages=lambda _r, msgs, tables: changed.add(msgs, tables)
        )
        since: float | None = None
        recorded: set[str] = set()
        sent_before: dict[str, dict[str, list[int]]] = {}  # per sharded table and shard, at the last record
        with (
            open_clients(postgres, d1, what="the streaming apply", context=context) as (pg, client),
            pg.clone() as checker,  # the checks read beside the apply, which has `pg` on its own thread
        ):
            evolved = ensure_schema(pg, client, schema)
            if evolved is not None:
                context.log.warning(f"schema.json changed: D1 updated first ({evolved})")
            pg.holder_label = f"run {context.run_id[:8]}"  # the sensor tells this run's lock by it
            stopped = False
            halt = threading.Event()  # set by SIGTERM or SIGINT: stop after the batch in hand

            def leaving(e: BaseException) -> None:
                if isinstance(e, dg.DagsterExecutionInterruptedError | KeyboardInterrupt):
                    context.instance.add_run_tags(context.run_id, {STOPPING_TAG: datetime.now(UTC).isoformat()})

            try:
                with _stop_on_signals(halt, lambda: leaving(KeyboardInterrupt())):
                    for landed in follow_queue(pg, client, schema, stream, options_here, stop=halt, on_leave=leaving):
                        if landed.following_since is not None:
                            since = landed.following_since
                            ends = datetime.fromtimestamp(landed.following_since + config.seconds, UTC)
                            context.instance.add_run_tags(
                                context.run_id, {ENDS_AT_TAG: ends.isoformat(timespec="seconds")}
                            )
                            context.log.info(f"streaming apply until {ends:%H:%M:%S} UTC, {landed.wake}")
                        final = landed
                        if not landed.tables:
                            continue
                        # What landed since the last record: one materialization per changed table with the figures
                        # summed, its checks on the rows those changes touched, and its source's observation.
                        touched = changed.take()
                        names = list(landed.tables)
                        recorded.update(names)
                        health = _checked(context, checker, client, schema, names, touched.keys)
                        figures = stream_figures(landed.totals, since)
                        sent_now = add_shards(landed.totals.shards, {})
                        reached = add_shards(sent_now, sent_before, sign=-1)
                        sent_before = sent_now
                        for name, stats in landed.tables.items():
                            md = table_metadata(stats, figures, landed.totals.position)
                            md["operation"] = dg.MetadataValue.text("stream")
                            key = wiring.asset_key(schema.table(name))
                            yield from recorded_events(key, md, reached.get(name, {}) if name in sharded else None)
                        keys = all_cheap_check_keys(schema, names, wiring=wiring)
                        for outcome in table_outcomes(
                            health, schema, keys, lag_threshold_seconds=lag_threshold_seconds, wiring=wiring
                        ):
                            yield outcome.evaluation()
                        for outcome in source_outcomes(health, schema, names, wiring):
                            yield outcome.evaluation()
                        yield from source_observations(touched, schema, wiring)
            except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
                # Ctrl-C or SIGTERM (a pod eviction): the apply stopped after the batch in hand (nothing is
                # lost, the standby takes the lock now); the run ends as a clean stop, not a failure.
                stopped = True
                context.log.info("streaming apply stopped (interrupted): the queue is left to the standby run")
            stopped = stopped or halt.is_set()
            if halt.is_set():
                context.log.info("streaming apply stopped (SIGTERM or Ctrl-C): the queue is left to the standby run")
            # The tables no change reached get their checks at the run's end (lag, dead letters, drift; no
            # rows to compare), so that every check is evaluated at least once a run, at O(tables) catalog
            # work and no D1 rows but the position's.
            quiet = [n for n in schema.names if n not in recorded]
            health = _checked(context, checker, client, schema, quiet, {})
        for outcome in table_outcomes(
            health,
            schema,
            all_cheap_check_keys(schema, quiet, wiring=wiring),
            lag_threshold_seconds=lag_threshold_seconds,
            wiring=wiring,
        ):
            yield outcome.evaluation()
        for outcome in source_outcomes(health, schema, quiet, wiring):
            yield outcome.evaluation()
        assert stopped or (final is not None and final.final)  # follow_queue ends with its report or raises
        report = final.totals if final is not None else ApplyReport(skipped="stopped before it took the queue")
        wake = final.wake if final is not None else ""
        if report.skipped:
            context.log.warning(f"streaming apply skipped: {report.skipped}")
        else:
            context.log.info(
                f"streamed {report.messages} messages in {report.duration_seconds:.1f}s ({wake}), "
                f"{report.requests} D1 requests, {report.dead_lettered} dead-lettered"
            )
        for found in report.drift.values():
            for d in found:
                context.log.warning(f"schema drift: {d}")
        md: dict[str, Any] = {k: dg.MetadataValue.float(float(round(v, 2))) for k, v in run_figures(report).items()}
        md["wake"] = dg.MetadataValue.text(wake)
        md["stopped"] = dg.MetadataValue.bool(stopped)
        md["skipped"] = dg.MetadataValue.text(report.skipped or "")
        yield dg.Output(None, metadata=md)

    @dg.job(
        name=wiring.name(STREAM_JOB),
        description=(
            "Streaming apply: follows the queue and applies each change within a fraction of a second of its "
            f"commit, for {default.seconds:g}s by default, then ends (the sensor starts the next one)."
        ),
        config={"ops": {op_name: {"config": {"seconds": default.seconds}}}},
    )
    def stream_job() -> None:
        stream_op()

    return stream_job
