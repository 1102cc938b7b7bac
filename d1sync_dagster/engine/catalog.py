"""What Postgres's catalog says about a replicated table's source relation (column types, key types)."""

from __future__ import annotations

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import Table
from d1sync_dagster.sql.capture import source_relation


def column_types(pg: PgmqClient, table: Table) -> dict[str, str]:
    """The Postgres type (`format_type`) of every column of the table's source relation."""
    rows = pg.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        [source_relation(table)],
    )
    return dict(rows)


def key_types(pg: PgmqClient, table: Table) -> list[str]:
    """The Postgres types of the key columns, to cast saved key text back exactly."""
    types = column_types(pg, table)
    missing = [k for k in table.key if k not in types]
    if missing:
        raise QueueError(f"{source_relation(table)} has no column(s) {', '.join(missing)} named as key in schema.json")
    return [types[k] for k in table.key]
