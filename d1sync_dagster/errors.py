"""Typed errors. Messages say what failed and where, never a secret and never a whole row of user data."""

from __future__ import annotations


class D1SyncError(Exception):
    """Base class of every error d1sync raises on purpose."""


class SchemaError(D1SyncError):
    """`schema.json` is missing, not JSON, or does not validate."""


class QueueError(D1SyncError):
    """Postgres or PGMQ failed or is unreachable. `sqlstate` is Postgres's error code when it sent one."""

    sqlstate: str | None = None

    @property
    def transient(self) -> bool:
        """A deadlock or serialization failure: the transaction can simply run again."""
        return self.sqlstate in ("40P01", "40001")


class D1Error(D1SyncError):
    """D1 refused a request or could not be reached.

    `statement_index` names the failing statement of a batch when it is known (always for the local
    backend and for statements refused before sending; the HTTP API itself does not say which statement
    of a batch failed). `status` is the HTTP status (None for transport errors and the local backend),
    `code` Cloudflare's error code (7500 for SQL errors), `retryable` whether a retry could succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        statement_index: int | None = None,
        status: int | None = None,
        code: int | None = None,
        retryable: bool = False,
    ) -> None:
        where = f" (statement {statement_index})" if statement_index is not None else ""
        super().__init__(f"{message}{where}")
        self.statement_index = statement_index
        self.status = status
        self.code = code
        self.retryable = retryable


class D1LimitError(D1Error):
    """A statement breaks one of D1's limits (bound parameters, statement size) before it is sent."""


class ReconcileError(D1SyncError):
    """Reconcile met drift it cannot decide on by itself (a D1 key Postgres cannot hold)."""


class ConfigError(D1SyncError):
    """Required configuration (environment variables) is missing or inconsistent."""
