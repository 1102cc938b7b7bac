"""Builds one `Definitions` from `schema.json`; `workspace.yaml` loads `defs` from here.

Secrets are wired as `dg.EnvVar`, so they are read when a run uses a resource and never stored in run
config. The D1 backend is the HTTP API when `CLOUDFLARE_ACCOUNT_ID` is set, else the local SQLite file.
"""

from __future__ import annotations

import os

import dagster as dg

from d1sync_dagster import config
from d1sync_dagster.defs.jobs import build_setup_job
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.schema import load_schema


def build_d1_resource() -> D1Resource:
    if os.environ.get("CLOUDFLARE_ACCOUNT_ID"):
        return D1Resource(
            account_id=dg.EnvVar("CLOUDFLARE_ACCOUNT_ID"),
            database_id=dg.EnvVar("CLOUDFLARE_D1_DATABASE_ID"),
            api_token=dg.EnvVar("CLOUDFLARE_API_TOKEN"),
            base_url=os.environ.get("CLOUDFLARE_API_BASE_URL") or D1Resource.model_fields["base_url"].default,
        )
    return D1Resource(local_path=os.environ.get("D1_LOCAL_PATH") or str(config.DEFAULT_STATE_DIR / "local.sqlite"))


def build_definitions(schema_file: str | None = None) -> dg.Definitions:
    """All d1sync definitions for one `schema.json`."""
    schema = load_schema(schema_file or config.schema_path())
    return dg.Definitions(
        jobs=[build_setup_job(schema)],
        resources={
            "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL"), queue=config.queue_name()),
            "d1": build_d1_resource(),
        },
    )


defs = build_definitions()
