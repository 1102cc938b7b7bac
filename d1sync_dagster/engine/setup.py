"""Setup: the capture migration in Postgres, tables and indexes in D1, the applied version recorded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client, Statement
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import QueueError, SchemaError
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import migration
from d1sync_dagster.sql.d1_ddl import schema_ddl, upsert_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetupResult:
    schema_version: str
    tables: list[str]
    d1_statements: int


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


def setup_d1(d1: D1Client, schema: Schema) -> int:
    """Create tables and indexes in D1 and record the schema version, in one batch (idempotent)."""
    stmts = [Statement(sql) for sql in schema_ddl(schema)]
    stmts.append(Statement(upsert_meta(), ("schema_version", schema.version)))
    stmts.append(Statement(upsert_meta(), ("schema_applied_at", datetime.now(UTC).isoformat(timespec="seconds"))))
    stmts += [Statement(upsert_meta(), (f"table_version:{t.name}", t.version)) for t in schema.tables]
    d1.batch(stmts)
    return len(stmts)


def setup(pg: PgmqClient, d1: D1Client, schema: Schema) -> SetupResult:
    """Both sides; Postgres first so no change is missed once D1 tables exist."""
    setup_postgres(pg, schema)
    n = setup_d1(d1, schema)
    log.info("setup done: %d tables, schema version %s", len(schema.tables), schema.version)
    return SetupResult(schema_version=schema.version, tables=schema.names, d1_statements=n)
