"""Resources hand out clients; they hold settings (secrets through `dg.EnvVar`) and no business logic."""

from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.config import D1Settings
from d1sync_dagster.errors import D1SyncError
from d1sync_dagster.sql.capture import DEFAULT_QUEUE


class PostgresResource(dg.ConfigurableResource):
    """The source Postgres with PGMQ: a direct connection or a pooler in session or transaction mode."""

    database_url: str = Field(description="postgresql:// URL; pass it as dg.EnvVar('DATABASE_URL')")
    queue: str = Field(default=DEFAULT_QUEUE, description="PGMQ queue that the capture triggers write to")

    def get_client(self) -> PgmqClient:
        return PgmqClient(self.database_url, queue=self.queue)


class D1Resource(dg.ConfigurableResource):
    """Cloudflare D1: the HTTP API when `account_id` is set, otherwise the local SQLite file `local_path`."""

    local_path: str | None = Field(default=None, description="SQLite file used as D1 (embedded default)")
    account_id: str | None = Field(default=None, description="Cloudflare account id")
    database_id: str | None = Field(default=None, description="D1 database id")
    api_token: str | None = Field(default=None, description="API token with D1 edit rights; pass as dg.EnvVar")
    base_url: str = Field(default="https://api.cloudflare.com/client/v4", description="API base URL")
    attempts: int = Field(default=5, description="tries per request on 429, 5xx and connection errors")
    shards_json: str | None = Field(
        default=None,
        description="the target's shard databases (variable names or paths, never secrets) and shard rules",
    )

    def settings(self) -> D1Settings:
        return D1Settings(
            local_path=None if self.account_id else (self.local_path or ".d1sync/local.sqlite"),
            account_id=self.account_id,
            database_id=self.database_id,
            api_token=self.api_token,
            base_url=self.base_url,
            attempts=self.attempts,
        )

    def get_client(self) -> D1Client:
        from d1sync_dagster.targets import open_shards  # targets builds on config, as this module does

        return open_shards(self.settings().client(), self.shards_json)


#: Run tag of a run stopped by the D1 API's request budget: when (UTC, ISO) D1 may be called again.
NOT_BEFORE_TAG = "d1sync/not_before"


@contextmanager
def open_clients(
    postgres: PostgresResource, d1: D1Resource, *, what: str, context: Any = None
) -> Iterator[tuple[PgmqClient, D1Client]]:
    """Fresh Postgres and D1 clients for one op, asset or check, closed after it. d1sync's errors become a
    `dg.Failure` that says what failed and why (the cause kept, never a secret). When the D1 API's budget is
    spent, the run (`context`) is tagged with `NOT_BEFORE_TAG`, which the sensor respects."""
    try:
        with closing(d1.get_client()) as client, postgres.get_client() as pg:
            yield pg, client
    except D1SyncError as e:
        retry_at = getattr(e, "retry_at", None)
        if retry_at is not None and context is not None:
            when = datetime.fromtimestamp(retry_at, UTC).isoformat(timespec="seconds")
            context.instance.add_run_tags(context.run_id, {NOT_BEFORE_TAG: when})
            raise dg.Failure(description=f"{what} failed: {e}; D1 may be called again from {when}") from e
        raise dg.Failure(description=f"{what} failed: {e}") from e
