"""d1sync: keep Cloudflare D1 tables in step with Postgres tables through PGMQ, orchestrated by Dagster."""

from d1sync_dagster.errors import ConfigError, D1Error, D1LimitError, D1SyncError, QueueError, SchemaError
from d1sync_dagster.schema import Schema, Table, load_schema, parse_schema

__all__ = [
    "ConfigError",
    "D1Error",
    "D1LimitError",
    "D1SyncError",
    "QueueError",
    "Schema",
    "SchemaError",
    "Table",
    "load_schema",
    "parse_schema",
]
