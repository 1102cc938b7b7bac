"""One asset per replicated table, `d1/<table>`, all materialized by one multi-asset that runs incremental
apply.

Replication design in brief: Postgres statement-level triggers write each change into one PGMQ queue; a
materialization drains that queue (under an advisory lock, so a UI run and a sensor run never interleave),
coalesces changes per primary key, writes them to D1 in packed batch requests and only then deletes the
messages. The queue is shared by every table, so a run always drains all of it; selecting a subset of
tables chooses which assets record a materialization, not which changes are applied. Each materialization
carries the table's figures (messages, upserts, deletes, dead letters, D1 rows written, lag).
"""

import dagster as dg

from d1sync_dagster.defs.resources import D1Resource, PostgresResource, open_clients
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.reports import TableStats
from d1sync_dagster.engine.setup import ensure_schema
from d1sync_dagster.schema import Schema, Table

GROUP = "d1"
SOURCE_GROUP = "postgres"


def asset_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["d1", table.target])


def source_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["postgres", table.spec.source_schema, table.name])


def source_spec(table: Table) -> dg.AssetSpec:
    """The Postgres table a D1 table replicates: an external asset (Dagster does not materialize it)."""
    return dg.AssetSpec(
        key=source_key(table),
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


def asset_spec(table: Table) -> dg.AssetSpec:
    """The translator: one `AssetSpec` per `schema.json` entry."""
    cols = ", ".join(f"{c} {t}" for c, t in table.columns.items())
    key = ", ".join(table.key)
    return dg.AssetSpec(
        key=asset_key(table),
        group_name=GROUP,
        description=(
            f"D1 table `{table.target}`, replicated from Postgres `{table.spec.source_schema}.{table.name}` "
            f"through PGMQ. Primary key ({key}); columns: {cols}."
        ),
        code_version=table.version,
        skippable=True,
        deps=[source_key(table)],
        kinds={"cloudflare", "sqlite"},
        owners=list(table.spec.owners),
        tags=dict(table.spec.tags),
        metadata={
            "dagster/table_name": dg.MetadataValue.text(table.target),
            "dagster/column_schema": column_schema(table),
            "source_table": dg.MetadataValue.text(f"{table.spec.source_schema}.{table.name}"),
            "primary_key": dg.MetadataValue.text(key),
            "columns": dg.MetadataValue.int(len(table.columns)),
        },
    )


def _table_metadata(stats: TableStats, run_figures: dict[str, float]) -> dict[str, dg.MetadataValue]:
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
    md |= {f"run_{k}": dg.MetadataValue.float(float(round(v, 2))) for k, v in run_figures.items()}
    md["summary"] = dg.MetadataValue.md(
        "| messages | upserts | deletes | dead letters | D1 rows written | oldest applied change (s) |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {stats.messages} | {stats.upserts} | {stats.deletes} | {stats.dead_lettered} | {stats.rows_written} "
        f"| {stats.lag_seconds or 0.0:.2f} |"
    )
    return md


def build_table_assets(schema: Schema, *, options: ApplyOptions | None = None) -> dg.AssetsDefinition:
    """The multi-asset that applies queued changes to every table of `schema`."""
    by_key = {asset_key(t): t for t in schema.tables}

    @dg.multi_asset(
        name="d1_incremental_apply",
        specs=[asset_spec(t) for t in schema.tables],
        can_subset=True,
        description="Drain the PGMQ change queue into D1 (exactly once in effect, ordered per row).",
    )
    def d1_tables(context: dg.AssetExecutionContext, postgres: PostgresResource, d1: D1Resource):
        with open_clients(postgres, d1, what="apply", context=context) as (pg, client):
            evolved = ensure_schema(pg, client, schema)
            if evolved is not None:
                context.log.warning(f"schema.json changed: D1 updated first ({evolved})")
            report = apply(pg, client, schema, options or ApplyOptions())
        if report.skipped:
            context.log.warning(f"apply skipped: {report.skipped}")
            return
        context.log.info(
            f"applied {report.messages} messages in {report.duration_seconds:.2f}s, {report.requests} D1 requests "
            f"({report.rows_per_request:.0f} rows/request), {report.dead_lettered} dead-lettered"
        )
        figures = {
            "messages": report.messages,
            "d1_requests": report.requests,
            "rows_per_request": report.rows_per_request,
            "changes_per_second": report.changes_per_second,
            "duration_seconds": report.duration_seconds,
        }
        for key in context.selected_asset_keys:
            table = by_key[key]
            yield dg.MaterializeResult(asset_key=key, metadata=_table_metadata(report.tables[table.name], figures))

    return d1_tables
