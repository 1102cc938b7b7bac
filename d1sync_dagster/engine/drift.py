"""Drift at apply time and for `doctor`/`status`/Dagster: the catalog read, and which tables' changes wait.

The check is one catalog query for every table of `schema.json` (and one of the columns setup recorded), so
it runs at the start of every apply, again whenever a batch holds a change that cannot apply, and at most
every `RECHECK_SECONDS` in between (a streaming run names a migration in its log within that time). The
findings themselves (`core/drift.py`) say which table and column changed, how, and the fix.

Holding (the apply's side, `Holding`): a table whose source drifted in a way that makes its changes wrong to
apply (a replicated column dropped or renamed, or retyped so that values no longer convert) starts holding at
its first change that cannot apply. From then on, every change of that table is moved, in order and byte for
byte, to the held queue `<queue>_held` instead of being applied or dead-lettered: nothing is written to D1 as
NULL or garbage, and the other tables keep flowing. Changes before that point apply (they were captured before
the DDL, with every column). Once `schema.json` follows and setup has run, the next apply finds no drift for
the table and applies its held changes first, in their order, before anything newer of the table
(`release`): every change made in between arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.drift import Drift, SourceColumn, find_drift
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import SOURCE_COLUMNS

log = logging.getLogger(__name__)

#: How often a long apply looks at the catalog again when nothing made it look sooner.
RECHECK_SECONDS = 10.0


def live_columns(pg: PgmqClient, schema: Schema) -> dict[str, dict[str, SourceColumn]]:
    """Each source table's columns now, by table name (a table missing from Postgres is absent)."""
    tables = schema.tables
    rows = pg.execute(
        "SELECT s.name, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), t.typname, t.typtype, "
        "t.typcategory = 'A' FROM unnest(%s::text[], %s::text[]) AS s(sch, name) "
        "JOIN pg_namespace n ON n.nspname = s.sch JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.name "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "JOIN pg_type t ON t.oid = a.atttypid",
        [[t.spec.source_schema for t in tables], [t.name for t in tables]],
    )
    out: dict[str, dict[str, SourceColumn]] = {}
    for table, name, attnum, pg_type, typname, typtype, is_array in rows:
        out.setdefault(table, {})[name] = SourceColumn(name, attnum, pg_type, typname, typtype, bool(is_array))
    return out


def recorded_columns(pg: PgmqClient, schema: Schema) -> dict[str, dict[str, SourceColumn]]:
    """The replicated columns as the last setup of this queue found them (empty before a setup that records)."""
    readable = pg.execute(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'd1sync' "
        "AND has_schema_privilege(oid, 'USAGE')) THEN false WHEN to_regclass(%s) IS NULL THEN false "
        "ELSE has_table_privilege(to_regclass(%s), 'SELECT') END",
        [SOURCE_COLUMNS, SOURCE_COLUMNS],
    )[0][0]
    if not readable:  # before a setup that records, or a role without rights on schema d1sync
        return {}
    by_table = {(t.spec.source_schema, t.name) for t in schema.tables}
    out: dict[str, dict[str, SourceColumn]] = {}
    for sch, table, name, attnum, pg_type in pg.execute(
        f"SELECT table_schema, table_name, column_name, attnum, pg_type FROM {SOURCE_COLUMNS} WHERE queue = %s",
        [pg.queue],
    ):
        if (sch, table) in by_table:
            out.setdefault(table, {})[name] = SourceColumn(name, attnum, pg_type)
    return out


def check(pg: PgmqClient, schema: Schema) -> dict[str, list[Drift]]:
    """Every table of `schema.json` whose source drifted, with its findings (two catalog queries)."""
    live, recorded = live_columns(pg, schema), recorded_columns(pg, schema)
    out: dict[str, list[Drift]] = {}
    for t in schema.tables:
        if t.name not in live:
            continue  # a missing table is doctor's finding; capture of a renamed table goes on as before
        found = find_drift(t.name, t.columns, tuple(t.key), live[t.name], recorded.get(t.name, {}))
        if found:
            out[t.name] = found
    return out


@dataclass
class Holding:
    """Which tables one apply holds. `drifted`: tables whose drift makes changes wrong to apply; `held`: those
    holding in this run (every change of theirs goes to the held queue)."""

    schema: Schema
    drift: dict[str, list[Drift]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    checked_at: float = 0.0

    @property
    def drifted(self) -> set[str]:
        return {t for t, found in self.drift.items() if any(d.holds for d in found)}

    def refresh(self, pg: PgmqClient) -> None:
        """Read the catalog again; log what is new."""
        before = {d.describe() for found in self.drift.values() for d in found}
        self.drift = check(pg, self.schema)
        self.checked_at = time.monotonic()
        for found in self.drift.values():
            for d in found:
                if d.describe() not in before:
                    log.warning("schema drift: %s", d.describe())

    def due(self) -> bool:
        return time.monotonic() - self.checked_at >= RECHECK_SECONDS

    def start(self, pg: PgmqClient, waiting: dict[str, int]) -> None:
        """At the start of a run: tables that still drift and already have held changes hold from the start
        (their held changes are older than anything queued)."""
        self.refresh(pg)
        self.held = {t for t in self.drifted if waiting.get(t)}

    def to_hold(self, first_bad: dict[str, int]) -> dict[str, int]:
        """Per table to hold in a batch, the first msg_id held: 0 for a table already holding, else its first
        change that cannot apply, when the table drifted (`first_bad`: per table, its first poison)."""
        out = {t: 0 for t in self.held}
        for t, msg_id in first_bad.items():
            if t in self.drifted and t not in out:
                out[t] = msg_id
                self.held.add(t)
                log.warning("holding the changes of %s from msg %d on: its source drifted from schema.json", t, msg_id)
        return out


def hold_split(messages: Sequence[tuple[int, str | None]], hold_from: dict[str, int]) -> tuple[set[int], set[int]]:
    """Split a batch's (msg_id, table) pairs into the ids held and the ids kept, per `Holding.to_hold`."""
    held, kept = set(), set()
    for msg_id, table in messages:
        start = hold_from.get(table) if table is not None else None
        (held if start is not None and msg_id >= start else kept).add(msg_id)
    return held, kept
