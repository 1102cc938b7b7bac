"""What d1sync itself reads from D1 a day at steady state, for `status`, `doctor` and the docs.

D1 bills every row a query reads (25 billion a month are included in the paid plan, then $0.001 per
million). d1sync's own reads at steady state:

- the per-apply checks compare, by key, the rows the changes touched: at most `KEYS_PER_CHECK` per table
  per record, and a table records at most once a minute in streaming mode (`record_every_seconds`), so at
  most 1,000 x 1,440 = 1.44 million rows per table a day, and never more than the changes themselves;
- the scheduled reconcile (`rows_match_source`, daily by default) reads every row of every table once;
- the position read with each record (one row) is negligible.

The table sizes come from Postgres's planner estimate (`pg_class.reltuples`): no table is scanned to say so.
"""

from __future__ import annotations

from dataclasses import dataclass

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import source_relation

#: Keys the per-apply row check compares at most, per table and evaluation (`engine/health.ChangedKeys`).
KEYS_PER_CHECK = 1000
#: D1 rows read included per month in the Workers Paid plan.
INCLUDED_PER_MONTH = 25_000_000_000


@dataclass(frozen=True)
class DailyReads:
    """d1sync's D1 rows read per day: the reconcile's (every row once a run) and the per-apply checks' bound."""

    reconcile: int
    checks_at_most: int
    tables: int

    @property
    def per_month_at_most(self) -> int:
        return 30 * (self.reconcile + self.checks_at_most)

    def describe(self) -> str:
        share = self.per_month_at_most / INCLUDED_PER_MONTH
        return (
            f"d1sync reads at most {self.reconcile + self.checks_at_most:,} D1 rows a day: {self.reconcile:,} by the "
            f"daily reconcile (every row of the {self.tables} tables once, Postgres's estimate) and at most "
            f"{self.checks_at_most:,} by the per-apply checks (the rows the changes touched, up to "
            f"{KEYS_PER_CHECK:,} per table a record); at most {self.per_month_at_most:,} a month, "
            f"{share:.1%} of the 25 billion included"
        )


def daily_reads(
    pg: PgmqClient, schema: Schema, *, record_every_seconds: float = 60.0, reconciles_per_day: float = 1.0
) -> DailyReads:
    found = pg.execute(
        "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM unnest(%s::text[]) r "
        "JOIN pg_class c ON c.oid = to_regclass(r)",
        [[source_relation(t) for t in schema.tables]],
    )
    rows = int(found[0][0])
    records = int(86_400 / max(record_every_seconds, 1.0))
    return DailyReads(
        reconcile=int(rows * reconciles_per_day),
        checks_at_most=len(schema.tables) * KEYS_PER_CHECK * records,
        tables=len(schema.tables),
    )
