"""d1sync: keep Cloudflare D1 tables in step with Postgres tables through PGMQ, orchestrated by Dagster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from d1sync_dagster.errors import ConfigError, D1Error, D1LimitError, D1SyncError, QueueError, SchemaError

if TYPE_CHECKING:
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

_FROM_SCHEMA = ("Schema", "Table", "load_schema", "parse_schema")


def __getattr__(name: str) -> Any:
    """The schema's names, imported on first use: importing any part of the package does not load pydantic
    and build the schema's models (about 19 MB, which the planner process, `engine/planner.py`, never
    needs)."""
    if name in _FROM_SCHEMA:
        from d1sync_dagster import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
