"""Typed errors. Messages say what failed and where, never a secret and never a whole row of user data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


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

    `kind` says what the failure means, whatever its HTTP status (`clients/d1_errors.py` classifies
    Cloudflare's answers; D1 uses code 7500 for temporary failures too):

    - `sql`: SQLite refused a statement for its content (a constraint, a value too big). Only this kind (and
      `limit`) may be bisected to find the change at fault and dead-letter it.
    - `limit`: a statement breaks one of D1's limits before it is sent.
    - `temporary`: D1 or the network failed for a moment (a reset, a lost connection, an internal error, an
      answer d1sync does not recognise): retry later, keep the queue as it is.
    - `overloaded`: D1 is overloaded or reset a query for its CPU, memory or time: back off and send less.
    - `rate_limited`: the API's request budget is spent; `retry_at` (epoch seconds) says when it comes back.
    - `quota`: a daily limit of the plan or the database's size is reached: stop and say so.
    - `auth`, `not_found`, `request`: the token, the ids or the request are wrong: fix the configuration.
    - `unreachable`: no answer at all.

    `statement_index` names the failing statement of a batch when it is known (always for the local backend
    and for statements refused before sending; the HTTP API does not say which statement of a batch
    failed). `status` is the HTTP status (None for transport errors and the local backend), `code`
    Cloudflare's error code.
    """

    RETRYABLE = frozenset({"temporary", "overloaded", "rate_limited", "unreachable"})

    def __init__(
        self,
        message: str,
        *,
        statement_index: int | None = None,
        status: int | None = None,
        code: int | None = None,
        kind: str = "request",
        retry_at: float | None = None,
    ) -> None:
        where = f" (statement {statement_index})" if statement_index is not None else ""
        super().__init__(f"{message}{where}")
        self.statement_index = statement_index
        self.status = status
        self.code = code
        self.kind = kind
        self.retry_at = retry_at

    @property
    def retryable(self) -> bool:
        """Whether the same request could succeed later (the queue then stays as it is)."""
        return self.kind in self.RETRYABLE

    @property
    def bisectable(self) -> bool:
        """Whether the content of the statements caused it, so that splitting the batch finds the change at
        fault (which is then dead-lettered)."""
        return self.kind in ("sql", "limit")


class D1LimitError(D1Error):
    """A statement breaks one of D1's limits (bound parameters, statement size) before it is sent."""

    def __init__(self, message: str, *, statement_index: int | None = None) -> None:
        super().__init__(message, statement_index=statement_index, kind="limit")


class ReconcileError(D1SyncError):
    """Reconcile met drift it cannot decide on by itself (a D1 key Postgres cannot hold)."""


class ConfigError(D1SyncError):
    """Required configuration (environment variables) is missing or inconsistent."""


def table_named(by_name: Mapping[str, T], name: str) -> T:
    """The table of that name, or the `SchemaError` naming the tables there are (`Schema.table` and
    `PlainSchema.table` share it; it lives here, below both, so neither imports the other)."""
    found = by_name.get(name)
    if found is not None:
        return found
    raise SchemaError(f"table {name!r} is not in schema.json (known: {', '.join(by_name)})")
