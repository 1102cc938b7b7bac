"""Jobs that are not asset materializations: setup, backfill, nuke (reconcile is an asset-check job, see
`defs/checks.py`). Each op calls the same engine function as the command line, with typed config."""

from typing import Any

import dagster as dg
from pydantic import Field

from d1sync_dagster.defs import guard
from d1sync_dagster.defs.checks import all_cheap_check_keys, table_outcomes
from d1sync_dagster.defs.keys import DEFAULT, Wiring
from d1sync_dagster.defs.resources import open_clients
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.doctor import diagnose
from d1sync_dagster.engine.health import d1_row_counts, table_health
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import Schema


class BackfillConfig(dg.Config):
    tables: list[str] = Field(default_factory=list, description="tables to backfill; empty means all")
    chunk_size: int = Field(default=5000, description="rows per chunk (one short transaction each)")
    restart: bool = Field(default=False, description="start over instead of resuming an unfinished backfill")


class NukeConfig(dg.Config):
    all_tables: bool = Field(default=False, description="drop and recreate every table")
    table: str | None = Field(default=None, description="or just this one")
    purge_queue: bool = Field(default=False, description="also drop their queued changes and dead letters")
    confirm: bool = Field(default=False, description="must be true: the tables' contents in D1 are lost")
    accept_no_restore_point: bool = Field(
        default=False, description="go ahead even when no D1 Time Travel bookmark can be taken first"
    )


def build_setup_job(schema: Schema, wiring: Wiring = DEFAULT) -> dg.JobDefinition:
    """`d1sync_setup`: queue and triggers in Postgres, tables and indexes in D1 (idempotent)."""

    @dg.op(
        name=wiring.name("d1sync_setup_op"),
        description="Create the PGMQ queue, capture triggers, D1 tables and indexes.",
        required_resource_keys=wiring.resource_keys,
    )
    def setup_op(context: dg.OpExecutionContext) -> dg.Output[None]:
        postgres, d1 = wiring.resources(context)
        with open_clients(postgres, d1, what="setup") as (pg, client):
            result = setup(pg, client, schema)
        context.log.info(f"setup done: schema version {result.schema_version}, tables {', '.join(result.tables)}")
        return dg.Output(
            None,
            metadata={
                "schema_version": dg.MetadataValue.text(result.schema_version),
                "tables": dg.MetadataValue.int(len(result.tables)),
                "d1_statements": dg.MetadataValue.int(result.d1_statements),
                "added_columns": dg.MetadataValue.text(", ".join(result.added_columns) or "none"),
            },
        )

    @dg.job(
        name=wiring.name("d1sync_setup"),
        description="Create or update the capture side in Postgres and the tables in D1.",
    )
    def setup_job() -> None:
        setup_op()

    return setup_job


def build_backfill_job(schema: Schema, wiring: Wiring = DEFAULT) -> dg.JobDefinition:
    @dg.op(
        name=wiring.name("d1sync_backfill_op"),
        description="Copy existing rows into D1 through the ordered queue.",
        required_resource_keys=wiring.resource_keys,
        pool=wiring.name("d1sync"),
    )
    def backfill_op(context: dg.OpExecutionContext, config: BackfillConfig) -> dg.Output[None]:
        postgres, d1 = wiring.resources(context)

        def progress(table: str, t: Any) -> None:
            context.log.info(f"backfill {table}: {t.rows} rows in {t.chunks} chunks, {t.rows_per_second:.0f} rows/s")

        with open_clients(postgres, d1, what="backfill") as (pg, client):
            report = backfill(
                pg,
                client,
                schema,
                tables=config.tables or None,
                chunk_size=config.chunk_size,
                restart=config.restart,
                on_chunk=progress,
            )
        md: dict[str, Any] = {
            "rows": dg.MetadataValue.int(report.rows),
            "seconds": dg.MetadataValue.float(report.seconds),
        }
        for name, t in report.tables.items():
            md[f"{name}_rows"] = dg.MetadataValue.int(t.rows)
            md[f"{name}_chunks"] = dg.MetadataValue.int(t.chunks)
            md[f"{name}_rows_per_second"] = dg.MetadataValue.float(round(t.rows_per_second, 1))
        return dg.Output(None, metadata=md)

    @dg.job(name=wiring.name("d1sync_backfill"), description="Backfill tables (all by default) into D1; resumable.")
    def backfill_job() -> None:
        backfill_op()

    return backfill_job


def build_nuke_job(
    schema: Schema, *, allow_destructive: bool = False, lag_threshold_seconds: float = 300.0, wiring: Wiring = DEFAULT
) -> dg.JobDefinition:
    """`d1sync_nuke`: refuses, before touching anything, unless the deployment allows destructive
    operations (`defs/guard.py`); records the launcher and restore point on the run and the tables' assets."""

    @dg.op(
        name=wiring.name("d1sync_nuke_op"),
        description=guard.describe("Drop and recreate D1 tables; needs confirm: true.", allowed=allow_destructive),
        required_resource_keys=wiring.resource_keys,
        pool=wiring.name("d1sync"),
    )
    def nuke_op(context: dg.OpExecutionContext, config: NukeConfig):
        if not allow_destructive:
            # Expected behaviour, not an error: the run ends having touched nothing, and says why (no stack
            # trace, no red step); the run's tag and output say it was refused.
            why = guard.refusal(wiring.name("d1sync_nuke"))
            context.instance.add_run_tags(context.run_id, {guard.REFUSED_TAG: "destructive operations are disabled"})
            context.log.warning(why)
            yield dg.Output(None, metadata={"refused": dg.MetadataValue.text(why)})
            return
        postgres, d1 = wiring.resources(context)
        if config.all_tables == bool(config.table):
            raise dg.Failure(description="set exactly one of all_tables: true or table: <name>")
        tables = None if config.all_tables else [config.table or ""]
        launcher = guard.Launcher.of(context.run)
        with open_clients(postgres, d1, what="nuke") as (pg, client):
            chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
            # Per database: a sharded table's asset is partitioned by shard, and each shard's partition
            # records what was dropped there.
            before = {t.name: d1_row_counts(client, t) for t in chosen} if config.confirm else {}
            report = nuke(
                pg,
                client,
                schema,
                tables=tables,
                purge_queue=config.purge_queue,
                confirm=config.confirm,
                launched_by=launcher.user,
                source=launcher.source,
                accept_no_restore_point=config.accept_no_restore_point,
            )
            health = table_health(pg, client, schema)
        guard.record(context, operation="nuke", launcher=launcher, restore_point=report.bookmark)
        done = {
            "operation": dg.MetadataValue.text("nuke: dropped and recreated empty"),
            "restore_bookmark": dg.MetadataValue.text(report.bookmark or ""),
            "launched_by": dg.MetadataValue.text(launcher.user),
            "launched_from": dg.MetadataValue.text(launcher.source),
            "queue_purged": dg.MetadataValue.bool(config.purge_queue),
        }
        for name in report.tables:  # the D1 tables' own history says what happened to them
            table = schema.table(name)
            for shard, dropped in sorted(before.get(name, {None: 0}).items(), key=lambda kv: kv[0] or ""):
                yield dg.AssetMaterialization(
                    asset_key=wiring.asset_key(table),
                    partition=shard,
                    metadata=done
                    | {
                        "rows_dropped": dg.MetadataValue.int(dropped),
                        "dagster/row_count": dg.MetadataValue.int(
                            (health[name].shard_rows or {}).get(shard, 0) if shard else health[name].d1_rows or 0
                        ),
                    },
                )
        # ... and their checks say what that means now (a row count check fails on an emptied table).
        keys = all_cheap_check_keys(schema, report.tables, wiring)
        for outcome in table_outcomes(health, schema, keys, lag_threshold_seconds=lag_threshold_seconds, wiring=wiring):
            yield outcome.evaluation()
        context.log.warning(
            f"nuked {', '.join(report.tables)} (launched by {launcher.user} from {launcher.source}; restore point "
            f"{report.bookmark}); materialize them with mode: backfill (or run d1sync_backfill) to fill them again"
        )
        yield dg.Output(
            None,
            metadata={
                "tables": dg.MetadataValue.text(", ".join(report.tables)),
                "purged_messages": dg.MetadataValue.int(report.purged_messages),
                "purged_dead_letters": dg.MetadataValue.int(report.purged_dead_letters),
            }
            | done,
        )

    @dg.job(
        name=wiring.name("d1sync_nuke"),
        description=guard.describe(
            "Drop and recreate all D1 tables or one (confirm: true required).", allowed=allow_destructive
        ),
    )
    def nuke_job() -> None:
        nuke_op()

    return nuke_job


def build_doctor_job(schema: Schema, wiring: Wiring = DEFAULT) -> dg.JobDefinition:
    """`d1sync_doctor`: the checks of `d1sync doctor`, with the findings as a table in the run; fails when
    replication is broken, saying why and how to fix it."""

    @dg.op(
        name=wiring.name("d1sync_doctor_op"),
        description="Check Postgres, PGMQ, the capture triggers and D1.",
        required_resource_keys=wiring.resource_keys,
    )
    def doctor_op(context: dg.OpExecutionContext) -> dg.Output[None]:
        postgres, d1 = wiring.resources(context)
        dx = diagnose(postgres.get_client, d1.get_client, schema)
        rows = "\n".join(
            f"| {f.check} | {f.level} | {f.detail.replace('|', '/')} | {f.fix.replace('|', '/')} |" for f in dx.findings
        )
        report = "| check | level | detail | fix |\n|---|---|---|---|\n" + rows
        problems = [f for f in dx.findings if f.level == "fail"]
        if dx.exit_code:
            raise dg.Failure(
                description="; ".join(f"{f.check}: {f.detail} (fix: {f.fix})" for f in problems),
                metadata={"findings": dg.MetadataValue.md(report)},
            )
        return dg.Output(None, metadata={"findings": dg.MetadataValue.md(report)})

    @dg.job(
        name=wiring.name("d1sync_doctor"),
        description="Check both sides of the replication and say how to fix problems.",
    )
    def doctor_job() -> None:
        doctor_op()

    return doctor_job
