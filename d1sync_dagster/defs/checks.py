"""Asset checks per table: D1 row count equals Postgres, replication lag under a threshold, no dead letters."""

import dagster as dg
from pydantic import Field

from d1sync_dagster.defs.assets import asset_key
from d1sync_dagster.defs.resources import D1Resource, PostgresResource, open_clients
from d1sync_dagster.engine.health import table_health
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.schema import Schema

ROW_COUNT, LAG, DEAD_LETTERS = "row_count_matches_source", "replication_lag_under_threshold", "no_dead_letters"
MATCHES = "rows_match_source"


class ReconcileConfig(dg.Config):
    repair: bool = Field(default=True, description="re-enqueue differing keys and apply them")
    chunk_size: int = Field(default=5000, description="rows per D1 read")


def build_reconcile_checks(schema: Schema) -> dg.AssetChecksDefinition:
    """`rows_match_source` per table: a full row-by-row comparison (reads every D1 row, so it runs in the
    scheduled `d1sync_reconcile` job, not after every apply). Fails when drift was found, even when the run
    repaired it; the metadata says what differed and what was re-enqueued."""
    specs = [
        dg.AssetCheckSpec(
            MATCHES,
            asset=asset_key(t),
            description=f"Every row of D1 `{t.target}` equals Postgres `{t.name}` after conversion (full compare).",
        )
        for t in schema.tables
    ]
    by_key = {asset_key(t): t for t in schema.tables}

    @dg.multi_asset_check(specs=specs, can_subset=True, name="d1_reconcile_checks")
    def d1_reconcile_checks(
        context: dg.AssetCheckExecutionContext, config: ReconcileConfig, postgres: PostgresResource, d1: D1Resource
    ):
        names = [by_key[k.asset_key].name for k in context.selected_asset_check_keys]
        with open_clients(postgres, d1, what="reconcile") as (pg, client):
            report = reconcile(
                pg, client, schema, tables=names, chunk_size=config.chunk_size, repair_drift=config.repair
            )
        for check_key in context.selected_asset_check_keys:
            t = report.tables[by_key[check_key.asset_key].name]
            sample = ", ".join(str(list(k)) for k in (t.missing + t.extra + t.different)[:20])
            yield dg.AssetCheckResult(
                asset_key=check_key.asset_key,
                check_name=MATCHES,
                passed=t.total == 0,
                metadata={
                    "postgres_rows": t.source_rows,
                    "d1_rows": t.d1_rows,
                    "missing": len(t.missing),
                    "extra": len(t.extra),
                    "different": len(t.different),
                    "repair_messages": t.repaired,
                    "d1_rows_read": t.d1_rows_read,
                    "sample_keys": sample or "none",
                },
            )

    return d1_reconcile_checks


def build_table_checks(schema: Schema, *, lag_threshold_seconds: float = 300.0) -> dg.AssetChecksDefinition:
    """Three checks for every table, computed together (one pass over the queue and the dead letters)."""
    specs = []
    for t in schema.tables:
        key = asset_key(t)
        specs += [
            dg.AssetCheckSpec(
                ROW_COUNT,
                asset=key,
                description=(
                    f"D1 `{t.target}` has as many rows as Postgres `{t.name}`, or is apart by no more than the "
                    "changes still queued for it can explain (exact when its queue is empty)."
                ),
            ),
            dg.AssetCheckSpec(
                LAG,
                asset=key,
                description=(
                    f"The oldest change of `{t.name}` still waiting in the queue is under {lag_threshold_seconds:g}s "
                    "old (`oldest_waiting_seconds`: how far D1 is behind now, unlike the materialization's "
                    "`applied_change_age_seconds`, which is how old the changes it applied were)."
                ),
            ),
            dg.AssetCheckSpec(
                DEAD_LETTERS, asset=key, description=f"No change of `{t.name}` is in the dead-letter queue."
            ),
        ]
    by_key = {asset_key(t): t for t in schema.tables}

    @dg.multi_asset_check(specs=specs, can_subset=True, name="d1_table_checks")
    def d1_table_checks(context: dg.AssetCheckExecutionContext, postgres: PostgresResource, d1: D1Resource):
        with open_clients(postgres, d1, what="the table checks") as (pg, client):
            health = table_health(pg, client, schema)
        for check_key in context.selected_asset_check_keys:
            table = by_key[check_key.asset_key]
            h = health[table.name]
            if check_key.name == ROW_COUNT:
                gap = h.source_rows - h.d1_rows
                if gap == 0:
                    says = "row counts are equal"
                elif h.count_explained:
                    says = f"D1 is {abs(gap)} rows apart, within what the {h.queued_rows} queued row changes explain"
                else:
                    says = f"D1 is {abs(gap)} rows apart; only {h.queued_rows} row changes are queued for it"
                if h.filtered:
                    says = h.filtered
                elif h.apply_running:
                    says += " (an apply held the queue while the counts were read, so D1 may have moved meanwhile)"
                yield dg.AssetCheckResult(
                    asset_key=check_key.asset_key,
                    check_name=ROW_COUNT,
                    passed=h.count_explained,
                    description=says,
                    metadata={
                        "postgres_rows": h.source_rows,
                        "d1_rows": h.d1_rows,
                        "queued_changes": h.queued,
                        "queued_row_changes": h.queued_rows,
                    },
                )
            elif check_key.name == LAG:
                yield dg.AssetCheckResult(
                    asset_key=check_key.asset_key,
                    check_name=LAG,
                    passed=(h.lag_seconds or 0.0) <= lag_threshold_seconds,
                    metadata={
                        "oldest_waiting_seconds": float(h.lag_seconds or 0.0),
                        "threshold_seconds": lag_threshold_seconds,
                    },
                )
            else:
                yield dg.AssetCheckResult(
                    asset_key=check_key.asset_key,
                    check_name=DEAD_LETTERS,
                    passed=h.dead_letters == 0,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"dead_letters": h.dead_letters},
                )

    return d1_table_checks
