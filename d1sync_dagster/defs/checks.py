"""Asset checks per table: D1 row count equals Postgres, replication lag under a threshold, no dead letters,
the source still has what schema.json replicates."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from d1sync_dagster.defs.keys import DEFAULT, Wiring
from d1sync_dagster.defs.resources import open_clients
from d1sync_dagster.engine.drift import check as check_drift
from d1sync_dagster.engine.health import TableHealth
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.schema import Schema

ROW_COUNT, LAG, DEAD_LETTERS = "row_count_matches_source", "replication_lag_under_threshold", "no_dead_letters"
MATCHES = "rows_match_source"
SOURCE_SCHEMA = "source_matches_schema"


class ReconcileConfig(dg.Config):
    repair: bool = Field(default=True, description="re-enqueue differing keys and apply them")
    chunk_size: int = Field(default=5000, description="rows per D1 read")


def build_reconcile_checks(
    schema: Schema, *, cron: str = "0 3 * * *", wiring: Wiring = DEFAULT
) -> dg.AssetChecksDefinition:
    """`rows_match_source` per table: a full row-by-row comparison (reads every D1 row, so it runs in the
    scheduled `d1sync_reconcile` job, not after every apply). Fails when drift was found, even when the run
    repaired it; the metadata says what differed and what was re-enqueued."""
    specs = [
        dg.AssetCheckSpec(
            MATCHES,
            asset=wiring.asset_key(t),
            description=(
                f"Every row of D1 `{t.target}` equals Postgres `{t.name}` after conversion (full compare). Scheduled, "
                f"not run with applies: d1sync_reconcile_schedule runs it at `{cron}`; until its first run it shows "
                "as not evaluated."
            ),
        )
        for t in schema.tables
    ]
    by_key = {wiring.asset_key(t): t for t in schema.tables}

    @dg.multi_asset_check(
        specs=specs,
        can_subset=True,
        name=wiring.name("d1_reconcile_checks"),
        required_resource_keys=wiring.resource_keys,
        pool=wiring.name("d1sync"),
    )
    def d1_reconcile_checks(context: dg.AssetCheckExecutionContext, config: ReconcileConfig):
        postgres, d1 = wiring.resources(context)
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


@dataclass(frozen=True)
class Outcome:
    """One cheap check's outcome, before it becomes an `AssetCheckResult` (inside the multi-asset) or an
    `AssetCheckEvaluation` (yielded by the streaming and nuke ops)."""

    asset_key: dg.AssetKey
    check_name: str
    passed: bool
    metadata: dict[str, float | int | str]
    description: str | None = None

    def _fields(self) -> dict[str, Any]:
        return {
            "asset_key": self.asset_key,
            "check_name": self.check_name,
            "passed": self.passed,
            "description": self.description,
            "metadata": self.metadata,
            "severity": dg.AssetCheckSeverity.ERROR,
        }

    def result(self) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(**self._fields())

    def evaluation(self) -> dg.AssetCheckEvaluation:
        return dg.AssetCheckEvaluation(**self._fields())


CHEAP_CHECKS = (ROW_COUNT, LAG, DEAD_LETTERS, SOURCE_SCHEMA)


def table_check_specs(
    schema: Schema, *, lag_threshold_seconds: float = 300.0, wiring: Wiring = DEFAULT
) -> list[dg.AssetCheckSpec]:
    """The three checks every table gets, evaluated in the same step as each apply, backfill or rebuild
    (one pass over the queue and the dead letters), and by the streaming run when it ends."""
    specs = []
    for t in schema.tables:
        key = wiring.asset_key(t)
        specs += [
            dg.AssetCheckSpec(
                ROW_COUNT,
                asset=key,
                description=(
                    f"The rows of `{t.name}` that each apply's changes touched (up to 1,000 per evaluation) are the "
                    f"same in D1 `{t.target}` as in Postgres, or apart by no more than the changes still queued for "
                    "it explain (exact when its queue is empty). It costs what the changes cost: those rows, read "
                    "by key on both sides (`d1_rows_read` in its metadata). The whole table is compared by "
                    "`rows_match_source` in the scheduled reconcile."
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
            dg.AssetCheckSpec(
                SOURCE_SCHEMA,
                asset=key,
                description=(
                    f"Postgres `{t.spec.source_schema}.{t.name}` still has every column schema.json replicates, in "
                    "types it takes; when a migration dropped, renamed or retyped one, the check names the column, "
                    "how it changed and the fix, and says how many changes wait in the held queue meanwhile."
                ),
            ),
        ]
    return specs


def table_outcomes(
    health: Mapping[str, TableHealth],
    schema: Schema,
    check_keys: Iterable[dg.AssetCheckKey],
    *,
    lag_threshold_seconds: float,
    wiring: Wiring = DEFAULT,
) -> list[Outcome]:
    """The outcomes of the cheap checks `check_keys` from one `table_health` reading."""
    by_key = {wiring.asset_key(t): t for t in schema.tables}
    out = []
    for check_key in check_keys:
        h = health.get(by_key[check_key.asset_key].name)
        if h is None:  # not read: the run left that table alone
            continue
        if check_key.name == ROW_COUNT:
            out.append(row_outcome(check_key.asset_key, h))
        elif check_key.name == LAG:
            lag = float(h.lag_seconds or 0.0)
            figures = {"oldest_waiting_seconds": lag, "threshold_seconds": lag_threshold_seconds}
            if h.position is not None:
                figures["d1_position"] = h.position
                figures["position_age_seconds"] = round(float(h.position_age_seconds or 0.0), 3)
            says = (
                f"the oldest change D1's position does not cover yet is {lag:.1f}s old"
                if h.queued
                else "nothing is waiting: D1's position covers every committed change"
            )
            out.append(Outcome(check_key.asset_key, LAG, lag <= lag_threshold_seconds, figures, says))
        elif check_key.name == DEAD_LETTERS:
            says = f"{h.dead_letters} dead letters" if h.dead_letters else "no dead letters"
            figures = {"dead_letters": h.dead_letters}
            out.append(Outcome(check_key.asset_key, DEAD_LETTERS, h.dead_letters == 0, figures, says))
        elif check_key.name == SOURCE_SCHEMA:
            out.append(schema_outcome(check_key.asset_key, SOURCE_SCHEMA, h.drift, h.drift_holds, h.held))
    return out


def row_outcome(key: dg.AssetKey, h: TableHealth) -> Outcome:
    """`row_count_matches_source`: after an apply, the rows its changes touched, compared on both sides
    (O(changes)); where the tables were counted whole (nuke, status), the counts. Its metadata says what the
    reading cost in D1 rows read (billed) and Postgres rows read."""
    cost: dict[str, float | int | str] = {"d1_rows_read": h.d1_rows_read, "postgres_rows_read": h.postgres_rows_read}
    queued = {"queued_changes": h.queued, "queued_row_changes": h.queued_rows}
    if h.compared is not None:
        c = h.compared
        if not h.changed_keys:
            says = "no change reached this table since the last check: nothing to compare"
        elif c.total == 0:
            says = f"the {h.changed_keys} rows the changes touched are the same in D1 as in Postgres"
        else:
            parts = [
                f"{len(ks)} {what}"
                for what, ks in (("missing", c.missing), ("extra", c.extra), ("different", c.different))
                if ks
            ]
            says = f"of the {h.changed_keys} rows the changes touched, {', '.join(parts)} in D1"
            says += (
                f", within what the {h.queued_rows} queued row changes explain"
                if h.count_explained
                else f"; only {h.queued_rows} row changes are queued for it"
            )
        says += " (the whole table is compared by the scheduled reconcile, rows_match_source)"
        figures: dict[str, float | int | str] = {
            "rows_compared": h.changed_keys,
            "postgres_rows_found": c.source_rows,
            "d1_rows_found": c.d1_rows,
            "missing": len(c.missing),
            "extra": len(c.extra),
            "different": len(c.different),
        }
        for shard, part in c.shards.items():
            figures[f"d1_rows_found_{shard}"] = part.d1_rows
        sample = ", ".join(str(list(k)) for k in (c.missing + c.extra + c.different)[:10])
        if sample:
            figures["sample_keys"] = sample
    else:
        gap = (h.source_rows or 0) - (h.d1_rows or 0)
        if gap == 0:
            says = "row counts are equal"
        elif h.count_explained:
            says = f"D1 is {abs(gap)} rows apart, within what the {h.queued_rows} queued row changes explain"
        else:
            says = f"D1 is {abs(gap)} rows apart; only {h.queued_rows} row changes are queued for it"
        figures = {"postgres_rows": h.source_rows or 0, "d1_rows": h.d1_rows or 0}
        for shard, rows in (h.shard_rows or {}).items():
            figures[f"d1_rows_{shard}"] = rows
    if h.filtered:
        says = h.filtered
    elif h.apply_running:
        says += " (an apply held the queue while this was read, so D1 may have moved meanwhile)"
    return Outcome(key, ROW_COUNT, h.count_explained, figures | queued | cost, says)


def schema_outcome(key: dg.AssetKey, name: str, drift: Iterable[str], holds: bool, held: int) -> Outcome:
    """`source_matches_schema`, on a D1 table's asset or on its Postgres source's: each drift with its fix,
    and the changes held meanwhile. Fails while the drift holds the table's changes."""
    found = list(drift)
    says = " | ".join(found) if found else "the source has every replicated column, in types schema.json takes"
    if held:
        says += f" | {held} change(s) held until schema.json follows and d1sync setup runs"
    return Outcome(key, name, not holds, {"drifted_columns": len(found), "held_changes": held}, says)


def source_outcomes(
    health: Mapping[str, TableHealth], schema: Schema, tables: Iterable[str], wiring: Wiring = DEFAULT
) -> list[Outcome]:
    """`source_matches_schema` on the Postgres source assets of `tables`, from the same reading (logged as
    evaluations: the D1 multi-asset cannot declare checks on assets it does not materialize)."""
    return [
        schema_outcome(wiring.source_key(t), wiring.name(SOURCE_SCHEMA), h.drift, h.drift_holds, h.held)
        for t in schema.tables
        if t.name in set(tables) and (h := health.get(t.name)) is not None
    ]


def build_source_checks(schema: Schema, *, wiring: Wiring = DEFAULT) -> dg.AssetChecksDefinition:
    """`source_matches_schema` per Postgres source table, runnable on its own from the UI (two catalog
    queries); applies and the streaming run evaluate it too, with the D1 tables' checks."""
    specs = [
        dg.AssetCheckSpec(
            wiring.name(SOURCE_SCHEMA),
            asset=wiring.source_key(t),
            description=(
                f"`{t.spec.source_schema}.{t.name}` still has every column schema.json replicates"
                + (f" to target {wiring.target}" if wiring.target else "")
                + ", in types it takes. A migration that dropped, renamed or retyped one fails it, naming the "
                "column, how it changed, the fix and the changes held meanwhile."
            ),
        )
        for t in schema.tables
    ]
    by_key = {wiring.source_key(t): t for t in schema.tables}

    @dg.multi_asset_check(
        specs=specs,
        can_subset=True,
        name=wiring.name("postgres_source_checks"),
        required_resource_keys=wiring.resource_keys,
    )
    def postgres_source_checks(context: dg.AssetCheckExecutionContext):
        postgres, d1 = wiring.resources(context)
        with open_clients(postgres, d1, what="the source check", context=context) as (pg, _):
            found, held = check_drift(pg, schema), pg.held_by_table()
        for check_key in context.selected_asset_check_keys:
            name = by_key[check_key.asset_key].name
            drift = found.get(name, [])
            yield schema_outcome(
                check_key.asset_key,
                check_key.name,
                [d.describe() for d in drift],
                any(d.holds for d in drift),
                held.get(name, 0),
            ).result()

    return postgres_source_checks


def all_cheap_check_keys(
    schema: Schema, tables: Iterable[str] | None = None, wiring: Wiring = DEFAULT
) -> list[dg.AssetCheckKey]:
    names = set(tables) if tables is not None else None
    return [
        dg.AssetCheckKey(wiring.asset_key(t), name)
        for t in schema.tables
        if names is None or t.name in names
        for name in CHEAP_CHECKS
    ]
