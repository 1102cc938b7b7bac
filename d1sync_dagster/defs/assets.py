"""One asset per replicated table, `d1/<table>`, all materialized by one multi-asset that runs incremental
apply.

Replication design in brief: Postgres statement-level triggers write each change into one PGMQ queue; a
materialization drains that queue (under an advisory lock, so a UI run and a sensor run never interleave),
coalesces changes per primary key, writes them to D1 in packed batch requests and only then deletes the
messages. The queue is shared by every table, so a run always drains all of it; the tables it changed
outside its selection are recorded too, as runtime materializations with their checks. Each materialization
carries the table's figures (messages, upserts, deletes, dead letters, D1 rows written, lag).
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

import dagster as dg
from pydantic import Field

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.defs import guard
from d1sync_dagster.defs.checks import all_cheap_check_keys, source_outcomes, table_check_specs, table_outcomes
from d1sync_dagster.defs.keys import DEFAULT, Wiring, asset_key, source_key
from d1sync_dagster.defs.resources import open_clients
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import BackfillReport, backfill
from d1sync_dagster.engine.health import ChangedKeys, Touched, d1_row_counts, table_health
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.reports import ApplyReport, TableStats
from d1sync_dagster.engine.setup import ensure_schema
from d1sync_dagster.schema import Schema, Table

__all__ = ["asset_key", "build_table_assets", "source_key", "source_spec"]

GROUP = "d1"
SOURCE_GROUP = "postgres"


def source_spec(table: Table, wiring: Wiring = DEFAULT) -> dg.AssetSpec:
    """The Postgres table a D1 table replicates: an external asset (Dagster does not materialize it)."""
    return dg.AssetSpec(
        key=wiring.source_key(table),
        group_name=SOURCE_GROUP,
        description=(
            f"Postgres table `{table.spec.source_schema}.{table.name}`, the source of D1 `{table.target}`. Its "
            "capture triggers queue every change into PGMQ; d1sync never writes to it."
        ),
        kinds={"postgres"},
        owners=list(table.spec.owners),
        tags=dict(table.spec.tags),
        metadata={"dagster/table_name": dg.MetadataValue.text(f"{table.spec.source_schema}.{table.name}")},
    )


def column_schema(table: Table) -> dg.TableSchema:
    key = set(table.key)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, type_, constraints=dg.TableColumnConstraints(nullable=name not in key))
            for name, type_ in table.columns.items()
        ],
        constraints=dg.TableConstraints(other=[f"PRIMARY KEY ({', '.join(table.key)})"]),
    )


def asset_spec(
    table: Table, wiring: Wiring = DEFAULT, partitions: dg.StaticPartitionsDefinition | None = None
) -> dg.AssetSpec:
    """The translator: one `AssetSpec` per `schema.json` entry; a sharded table's is partitioned by shard
    (`partitions`: the target's shard databases)."""
    cols = ", ".join(f"{c} {t}" for c, t in table.columns.items())
    key = ", ".join(table.key)
    where = f" of target `{wiring.target}`" if wiring.target else ""
    return dg.AssetSpec(
        key=wiring.asset_key(table),
        group_name=wiring.group,
        description=(
            f"D1 table `{table.target}`{where}, replicated from Postgres `{table.spec.source_schema}.{table.name}` "
            f"through PGMQ. Primary key ({key}); columns: {cols}."
        ),
        code_version=table.version,
        skippable=True,
        partitions_def=partitions,
        deps=[wiring.source_key(table)],
        kinds={"cloudflare", "sqlite"},
        owners=list(table.spec.owners),
        tags=dict(table.spec.tags),
        metadata={
            "dagster/table_name": dg.MetadataValue.text(table.target),
            "dagster/column_schema": column_schema(table),
            "source_table": dg.MetadataValue.text(f"{table.spec.source_schema}.{table.name}"),
            "primary_key": dg.MetadataValue.text(key),
            "columns": dg.MetadataValue.int(len(table.columns)),
        }
        | ({"sharded_over": dg.MetadataValue.text(", ".join(partitions.get_partition_keys()))} if partitions else {}),
    )


def shard_partitions(shards: Sequence[str]) -> dg.StaticPartitionsDefinition | None:
    """The partitions of a target's sharded tables: one per shard database (none without shards)."""
    return dg.StaticPartitionsDefinition(list(shards)) if shards else None


def recorded(
    key: dg.AssetKey, md: dict[str, dg.MetadataValue], shards: Mapping[str, Sequence[int]] | None
) -> list[dg.AssetMaterialization]:
    """A table's materialization logged at run time: one, or for a sharded table (`shards` not None) one per
    shard database its changes reached, as that shard's partition, with the statements and D1 rows written
    there (the other figures are the table's, over its shards). A sharded table whose changes reached no
    shard (all dead-lettered or held) gets one materialization outside its partitions, so that its history
    still says what happened."""
    if not shards:
        return [dg.AssetMaterialization(asset_key=key, metadata=md)]
    return [
        dg.AssetMaterialization(
            asset_key=key,
            partition=shard,
            metadata=md
            | {
                "shard": dg.MetadataValue.text(shard),
                "shard_statements": dg.MetadataValue.int(int(sent[0])),
                "shard_rows_written": dg.MetadataValue.int(int(sent[1])),
            },
        )
        for shard, sent in sorted(shards.items())
    ]


#: The run figures that are counts.
_COUNTS = frozenset({"messages", "d1_requests"})


def table_metadata(
    stats: TableStats, run_figures: dict[str, float], position: str | None = None
) -> dict[str, dg.MetadataValue]:
    md: dict[str, dg.MetadataValue] = {
        "messages": dg.MetadataValue.int(stats.messages),
        "upserts": dg.MetadataValue.int(stats.upserts),
        "deletes": dg.MetadataValue.int(stats.deletes),
        "truncates": dg.MetadataValue.int(stats.truncates),
        "dead_lettered": dg.MetadataValue.int(stats.dead_lettered),
        "d1_statements": dg.MetadataValue.int(stats.statements),
        "d1_rows_written": dg.MetadataValue.int(stats.rows_written),
        # How old the oldest change this run applied was when it landed (commit to D1); the lag check's
        # `oldest_waiting_seconds` is how old the oldest change still waiting is.
        "applied_change_age_seconds": dg.MetadataValue.float(float(round(stats.lag_seconds or 0.0, 3))),
    }
    if position is not None:  # read-your-writes: every transaction this snapshot sees is in D1 (core/txns.py)
        md["d1_position"] = dg.MetadataValue.text(position)
    if stats.held or stats.released:  # the source drifted from schema.json (docs/design.md, "Schema drift")
        md["held_changes"] = dg.MetadataValue.int(stats.held)
        md["released_changes"] = dg.MetadataValue.int(stats.released)
    # Counts as integers (the UI showed 2943.0), rates and durations as floats.
    md |= {
        f"run_{k}": dg.MetadataValue.int(int(v)) if k in _COUNTS else dg.MetadataValue.float(float(round(v, 2)))
        for k, v in run_figures.items()
    }
    md["summary"] = dg.MetadataValue.md(
        "| messages | upserts | deletes | dead letters | D1 rows written | oldest applied change (s) |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {stats.messages} | {stats.upserts} | {stats.deletes} | {stats.dead_lettered} | {stats.rows_written} "
        f"| {stats.lag_seconds or 0.0:.2f} |"
    )
    return md


class TablesConfig(dg.Config):
    """What a materialization of the D1 table assets does (UI: Materialize -> Open launchpad)."""

    mode: Literal["apply", "backfill", "rebuild"] = Field(
        default="apply",
        description=(
            "apply: drain the queued changes (of every table; the selected ones record a materialization). "
            "backfill: copy every row of the selected tables through the queue, resumable. rebuild: drop and "
            "recreate the selected D1 tables, then backfill them (destructive: needs D1SYNC_ALLOW_DESTRUCTIVE=1 "
            "and confirm: true). A run of a sharded table's partitions backfills those shards (apply or backfill; "
            "a rebuild is of the whole table)."
        ),
    )
    record_unchanged: bool = Field(
        default=True,
        description="also record a materialization for a selected table no change reached (the sensor sets false)",
    )
    chunk_size: int = Field(default=5000, description="backfill and rebuild: rows per chunk")
    restart: bool = Field(default=False, description="backfill: start over instead of resuming an unfinished one")
    shard: str | None = Field(
        default=None, description="backfill: only this shard of the selected sharded tables (targets.json shards)"
    )
    wait_for_consumer_seconds: float = Field(
        default=600.0,
        description=(
            "backfill and rebuild: while another consumer (the streaming run) holds the queue, it applies the "
            "chunks; wait this long for it before recording the materialization"
        ),
    )
    confirm: bool = Field(default=False, description="rebuild: must be true, the tables' contents in D1 are replaced")
    accept_no_restore_point: bool = Field(
        default=False, description="rebuild: go ahead even when no D1 Time Travel bookmark can be taken first"
    )


def _backfill_metadata(report: BackfillReport, name: str) -> dict[str, dg.MetadataValue]:
    t = report.tables[name]
    return {
        "backfill_rows": dg.MetadataValue.int(t.rows),
        "backfill_chunks": dg.MetadataValue.int(t.chunks),
        "backfill_rows_per_second": dg.MetadataValue.float(float(round(t.rows_per_second, 1))),
        "backfill_seconds": dg.MetadataValue.float(float(round(report.seconds, 2))),
    }


def build_table_assets(
    schema: Schema,
    *,
    options: ApplyOptions | None = None,
    lag_threshold_seconds: float = 300.0,
    allow_destructive: bool = False,
    wiring: Wiring = DEFAULT,
    shards: Sequence[str] = (),
    sharded: Mapping[str, Sequence[str]] | None = None,
) -> dg.AssetsDefinition:
    """The multi-asset that applies queued changes to every table of `schema` (or backfills or rebuilds the
    selected ones, by `TablesConfig.mode`), with the tables' cheap checks evaluated in the same step.

    With shard databases (`shards`; `sharded`: each sharded table -> the shards its rule routes to), the
    sharded tables' assets are partitioned by shard. A run with a partition key (Dagster's Backfills page,
    the `d1sync_backfill_shards` job) backfills that shard of the selected sharded tables; any other run
    records each sharded table's changes as materializations of the shards they reached."""
    by_key = {wiring.asset_key(t): t for t in schema.tables}
    apply_options = options or ApplyOptions()
    routes = dict(sharded or {})
    partitions = shard_partitions(shards) if routes else None

    @dg.multi_asset(
        name=wiring.name("d1_incremental_apply"),
        specs=[asset_spec(t, wiring, partitions if t.name in routes else None) for t in schema.tables],
        check_specs=table_check_specs(schema, lag_threshold_seconds=lag_threshold_seconds, wiring=wiring),
        can_subset=True,
        required_resource_keys=wiring.resource_keys,
        pool=wiring.name("d1sync"),
        description=(
            "Drain the PGMQ change queue into D1 (exactly once in effect, ordered per row); with mode backfill or "
            "rebuild, copy the selected tables; for a shard's partition, backfill that shard. Each table's checks "
            "run after it."
        ),
    )
    def d1_tables(context: dg.AssetExecutionContext, config: TablesConfig):
        postgres, d1 = wiring.resources(context)
        chosen = [by_key[k] for k in context.selected_asset_keys]
        if context.has_partition_key:
            yield from _backfill_shard(context, config, schema, chosen, routes, lag_threshold_seconds, wiring)
            return
        changed, touched = ChangedKeys(schema), Touched()
        options = replace(apply_options, on_batch_messages=lambda _r, msgs, tables: changed.add(msgs, tables))
        with open_clients(postgres, d1, what=config.mode, context=context) as (pg, client):
            extra: dict[str, dict[str, dg.MetadataValue]] = {t.name: {} for t in chosen}
            report = None
            if chosen:  # else only checks were selected ("Execute checks" in the UI)
                evolved = ensure_schema(pg, client, schema)
                if evolved is not None:
                    context.log.warning(f"schema.json changed: D1 updated first ({evolved})")
                report = _run_mode(context, config, pg, client, schema, chosen, options, extra, allow_destructive)
            if report is None:  # checks asked for by hand: count their tables whole
                checked = {by_key[k.asset_key].name for k in context.selected_asset_check_keys}
                health = table_health(pg, client, schema, tables=checked)
            elif report.skipped:
                health = {}
            else:
                # Only the tables this run records, and in apply mode only the rows its changes touched:
                # the run's cost grows with what changed, not with schema.json (a backfill counts whole).
                recorded_names = [t.name for t in chosen if _records(t.name, report, extra, config)]
                # Changes the run applied to tables outside its selection (they arrived after the sensor
                # chose) are recorded too, as runtime events: every applied change is in some record.
                recorded_names += [n for n, st in report.tables.items() if st.messages and n not in extra]
                touched = changed.take()
                keys = touched.keys if config.mode == "apply" else None
                health = table_health(pg, client, schema, tables=recorded_names, keys=keys)
        if report is not None and report.skipped:
            context.log.warning(f"apply skipped: {report.skipped}")
        elif report is not None:
            context.log.info(
                f"{config.mode}: applied {report.messages} messages in {report.duration_seconds:.2f}s, "
                f"{report.requests} D1 requests ({report.rows_per_request:.0f} rows/request), "
                f"{report.dead_lettered} dead-lettered"
            )
            if report.caught_up:
                context.log.info(
                    "the run ended at the backlog it found: changes committed while it ran came in as fast as it "
                    "applied them and wait for the next run (the streaming run follows the queue instead)"
                )
            for found in report.drift.values():
                for d in found:
                    context.log.warning(f"schema drift: {d}")
            figures = run_figures(report)
            for name in health:
                t = schema.table(name)
                md = table_metadata(report.tables[name], figures, report.position) | extra.get(name, {})
                if health[name].d1_rows is not None:  # counted whole (a backfill or rebuild)
                    md["dagster/row_count"] = dg.MetadataValue.int(health[name].d1_rows or 0)
                md["operation"] = dg.MetadataValue.text(config.mode)
                if name in extra and name not in routes:
                    yield dg.MaterializeResult(asset_key=wiring.asset_key(t), metadata=md)
                else:  # outside the selection, or sharded: a materialization per shard the changes reached
                    shards_reached = report.shards.get(name, {}) if name in routes else None
                    for event in recorded(wiring.asset_key(t), md, shards_reached):
                        context.log_event(event)
            outside = [n for n in health if n not in extra]
            for outcome in table_outcomes(
                health,
                schema,
                all_cheap_check_keys(schema, outside, wiring),
                lag_threshold_seconds=lag_threshold_seconds,
                wiring=wiring,
            ):
                context.log_event(outcome.evaluation())
        outcomes = table_outcomes(
            health,
            schema,
            context.selected_asset_check_keys,
            lag_threshold_seconds=lag_threshold_seconds,
            wiring=wiring,
        )
        for outcome in outcomes:
            yield outcome.result()
        for outcome in source_outcomes(health, schema, list(health), wiring):
            context.log_event(outcome.evaluation())
        for observation in source_observations(touched, schema, wiring):
            context.log_event(observation)

    return d1_tables


def _backfill_shard(
    context: dg.AssetExecutionContext,
    config: TablesConfig,
    schema: Schema,
    chosen: list[Table],
    routes: Mapping[str, Sequence[str]],
    lag_threshold_seconds: float,
    wiring: Wiring,
):
    """A run of one shard's partition: backfill that shard of the selected sharded tables that route to it,
    record each as its partition's materialization with the shard's figures, and run their checks."""
    shard = context.partition_key
    if config.mode == "rebuild":
        raise dg.Failure(
            description=f"a rebuild drops the whole table in every shard: materialize {shard!r}'s partition with mode "
            "backfill, or rebuild the table without a partition (d1sync nuke, then backfill)"
        )
    names = [t.name for t in chosen if shard in routes.get(t.name, ())]
    for t in chosen:
        if t.name not in names:
            context.log.info(f"{t.name}: no row of it routes to shard {shard}, nothing to backfill there")
    if not names:
        return
    postgres, d1 = wiring.resources(context)
    with open_clients(postgres, d1, what="backfill", context=context) as (pg, client):
        report = backfill(
            pg,
            client,
            schema,
            tables=names,
            chunk_size=config.chunk_size,
            restart=config.restart,
            shard=shard,
            wait_for_consumer_seconds=config.wait_for_consumer_seconds,
            on_chunk=lambda table, t: context.log.info(f"backfill {table} in {shard}: {t.rows} rows"),
        )
        why = report.not_landed(f"backfill of shard {shard}", config.wait_for_consumer_seconds)
        if why is not None:
            raise dg.Failure(description=why + ": materialize the partition again to record it")
        # The tables were read whole (a backfill reads every row anyway): count them, per shard.
        health = table_health(pg, client, schema, tables=names)
    for name in names:
        in_shard = (health[name].shard_rows or {}).get(shard, 0)
        yield dg.MaterializeResult(
            asset_key=wiring.asset_key(schema.table(name)),
            metadata=_backfill_metadata(report, name)
            | {
                "operation": dg.MetadataValue.text(f"backfill of shard {shard}"),
                "shard": dg.MetadataValue.text(shard),
                "shard_rows": dg.MetadataValue.int(in_shard),
                "dagster/row_count": dg.MetadataValue.int(in_shard),
                "applied_by": dg.MetadataValue.text(report.handed_to or "this run"),
            },
        )
    # (a selected check of a table that does not route to this shard has no reading: it is left unevaluated)
    for outcome in table_outcomes(
        health, schema, context.selected_asset_check_keys, lag_threshold_seconds=lag_threshold_seconds, wiring=wiring
    ):
        yield outcome.result()


def source_observations(touched: Touched, schema: Schema, wiring: Wiring = DEFAULT) -> list[dg.AssetObservation]:
    """An observation of each Postgres source table a change came from: how many changes, and when the newest
    was committed (the source assets are external: observing them is how their history shows in the UI)."""
    return [
        dg.AssetObservation(
            asset_key=wiring.source_key(schema.table(name)),
            metadata={
                "changes": dg.MetadataValue.int(n),
                "last_change": dg.MetadataValue.timestamp(touched.newest[name]),
            },
        )
        for name, n in touched.changes.items()
        if name in schema.by_name and name in touched.newest
    ]


def _records(
    name: str, report: ApplyReport, extra: dict[str, dict[str, dg.MetadataValue]], config: TablesConfig
) -> bool:
    """Whether the run records a materialization of the table: a change reached it, the mode did something
    to it, or the run was asked to record every selected table."""
    return bool(report.tables[name].messages or extra[name] or config.record_unchanged)


def _run_mode(
    context: dg.AssetExecutionContext,
    config: TablesConfig,
    pg: PgmqClient,
    client: D1Client,
    schema: Schema,
    chosen: list[Table],
    options: ApplyOptions,
    extra: dict[str, dict[str, dg.MetadataValue]],
    allow_destructive: bool,
) -> ApplyReport:
    """Apply, backfill or rebuild; fills `extra` with what the mode adds to each table's materialization."""
    if config.mode == "apply":
        return apply(pg, client, schema, options)
    names = [t.name for t in chosen]
    if config.mode == "rebuild":
        if not allow_destructive:
            raise dg.Failure(description=guard.refusal("a rebuild (mode: rebuild)"))
        if not config.confirm:
            raise dg.Failure(description="a rebuild drops and recreates the D1 tables: set confirm: true")
        launcher = guard.Launcher.of(context.run)
        before = {t.name: d1_row_count(client, t) for t in chosen}
        dropped = nuke(
            pg, client, schema, tables=names, confirm=True, launched_by=launcher.user, source=launcher.source,
            accept_no_restore_point=config.accept_no_restore_point,
        )  # fmt: skip
        guard.record(context, operation="rebuild", launcher=launcher, restore_point=dropped.bookmark)
        for t in chosen:
            extra[t.name] |= {
                "rows_dropped": dg.MetadataValue.int(before[t.name]),
                "restore_bookmark": dg.MetadataValue.text(dropped.bookmark or ""),
                "launched_by": dg.MetadataValue.text(launcher.user),
            }
    done = backfill(
        pg,
        client,
        schema,
        tables=names,
        chunk_size=config.chunk_size,
        restart=config.restart or config.mode == "rebuild",
        apply_options=options,
        on_chunk=lambda table, t: context.log.info(f"{config.mode} {table}: {t.rows} rows in {t.chunks} chunks"),
        shard=config.shard if config.mode == "backfill" else None,
        wait_for_consumer_seconds=config.wait_for_consumer_seconds,
    )
    for t in chosen:
        if t.name in done.tables:
            extra[t.name] |= _backfill_metadata(done, t.name)
    applied = done.apply or ApplyReport()
    if applied.skipped:  # the streaming run (or a CLI apply) holds the queue: it applied the chunks, or not yet
        why = done.not_landed(config.mode, config.wait_for_consumer_seconds)
        if why is not None:
            raise dg.Failure(description=why + ": materialize again to record them")
        context.log.info(f"{config.mode}: the chunks were applied by {done.handed_to}, which holds the queue")
        for t in chosen:
            extra[t.name]["applied_by"] = dg.MetadataValue.text(done.handed_to or "")
        return ApplyReport(tables=applied.tables)
    return applied


def run_figures(report: ApplyReport) -> dict[str, float]:
    """The run's figures, shown with each table's materialization as `run_<name>`; the planner process's
    peak memory only where one ran (a large drain)."""
    figures = {
        "messages": report.messages,
        "d1_requests": report.requests,
        "rows_per_request": report.rows_per_request,
        "changes_per_second": report.changes_per_second,
        "duration_seconds": report.duration_seconds,
    }
    if report.planner_peak_mb is not None:
        figures["planner_peak_mb"] = report.planner_peak_mb
    return figures


def d1_row_count(client: D1Client, table: Table) -> int:
    """The table's rows in D1 (summed over its shards when it is sharded)."""
    return sum(d1_row_counts(client, table).values())
