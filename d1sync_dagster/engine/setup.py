"""Setup: the capture migration in Postgres, tables and indexes in D1, the applied version recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client, Statement
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import QueueError, SchemaError
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import migration
from d1sync_dagster.sql.d1_ddl import add_column, schema_ddl, upsert_meta
from d1sync_dagster.sql.quoting import literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetupResult:
    schema_version: str
    tables: list[str]
    d1_statements: int
    added_columns: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)


def d1_columns(d1: D1Client, schema: Schema) -> dict[str, set[str]]:
    """Columns of the schema's tables that already exist in D1, by D1 table name (one request)."""
    names = ", ".join(literal(t.target) for t in schema.tables)
    (res,) = d1.query(
        "SELECT m.name AS tbl, p.name AS col FROM sqlite_master AS m, pragma_table_info(m.name) AS p "
        f"WHERE m.type = 'table' AND m.name IN ({names})"
    )
    out: dict[str, set[str]] = {}
    for r in res.results:
        out.setdefault(r["tbl"], set()).add(r["col"])
    return out


def setup_postgres(pg: PgmqClient, schema: Schema) -> None:
    """Install the queue, the dead-letter queue, capture functions and triggers (idempotent)."""
    if not pg.has_pgmq():
        try:
            pg.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        except QueueError as e:
            raise QueueError(
                f"PGMQ is not installed in this database and could not be created ({e}); on Supabase enable "
                "the pgmq extension, elsewhere install it (https://github.com/pgmq/pgmq)"
            ) from None
    missing = [
        f"{t.spec.source_schema}.{t.name}"
        for t in schema.tables
        if pg.execute("SELECT to_regclass(%s) IS NULL", [f'"{t.spec.source_schema}"."{t.name}"'])[0][0]
    ]
    if missing:
        raise SchemaError(
            f"source table(s) {', '.join(missing)} named in schema.json do not exist in Postgres; create them "
            "or remove them from schema.json"
        )
    pg.execute(migration(schema, queue=pg.queue))


def setup_d1(d1: D1Client, schema: Schema) -> tuple[int, list[str], list[str]]:
    """Create tables and indexes in D1, add columns new in `schema.json` to existing tables, and record the
    schema version, in one batch (idempotent). Returns (statements, added columns, columns D1 has that the
    schema no longer names). Added columns start NULL in existing rows until a backfill fills them."""
    existing = d1_columns(d1, schema)
    added, extra = [], []
    alters = []
    for t in schema.tables:
        have = existing.get(t.target)
        if have is None:
            continue
        for col, typ in t.columns.items():
            if col not in have:
                alters.append(Statement(add_column(t, col)))
                added.append(f"{t.target}.{col} {typ}")
        extra += [f"{t.target}.{c}" for c in sorted(have - set(t.columns))]
    stmts = [Statement(sql) for sql in schema_ddl(schema)]
    # Columns first: a new index may name a new column.
    stmts = stmts[:1] + alters + stmts[1:]
    stmts.append(Statement(upsert_meta(), ("schema_version", schema.version)))
    stmts.append(Statement(upsert_meta(), ("schema_applied_at", datetime.now(UTC).isoformat(timespec="seconds"))))
    stmts += [Statement(upsert_meta(), (f"table_version:{t.name}", t.version)) for t in schema.tables]
    d1.batch(stmts)
    for c in added:
        log.warning("added column %s in D1; existing rows hold NULL there until a backfill", c)
    for c in extra:
        log.warning("D1 column %s is not in schema.json; it is left in place", c)
    return len(stmts), added, extra


def setup(pg: PgmqClient, d1: D1Client, schema: Schema) -> SetupResult:
    """Both sides; Postgres first so no change is missed once D1 tables exist."""
    setup_postgres(pg, schema)
    n, added, extra = setup_d1(d1, schema)
    log.info("setup done: %d tables, schema version %s", len(schema.tables), schema.version)
    return SetupResult(schema.version, schema.names, n, added, extra)
