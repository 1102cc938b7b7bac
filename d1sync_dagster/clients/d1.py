"""The D1 interface and its Cloudflare HTTP API backend (httpx).

One interface, several transports: the engine plans `Statement`s and hands them to a `D1Client`; how they
reach D1 (HTTP API, a local SQLite file, later a Worker binding) is the backend's business.

Parameters travel as strings (the published API types `params` as strings; SQLite's column affinity turns
numeric text into exact INTEGER/REAL in columns declared so, which is how integers beyond 2^53 stay
exact). Booleans become "1"/"0" (D1 would store a JSON `true` as the text "true"). BLOBs cannot be bound
over the API at all: the planner inlines them as `X'..'` literals.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from d1sync_dagster.core.statements import MAX_BOUND_PARAMS, MAX_STATEMENT_BYTES, Param, Statement
from d1sync_dagster.errors import D1Error, D1LimitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryResult:
    """What D1 returned for one statement: rows as dicts and D1's `meta` (rows_written, rows_read, ...)."""

    results: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_written(self) -> int:
        return int(self.meta.get("rows_written") or 0)

    @property
    def rows_read(self) -> int:
        return int(self.meta.get("rows_read") or 0)


class D1Client(Protocol):
    """What the engine needs from D1."""

    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        """Run statements in order as one request (D1 runs a batch as one transaction); one result each."""
        ...

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[QueryResult]:
        """Run a SQL string; several `;`-separated statements give one result per statement."""
        ...

    def raw(self, sql: str, params: Sequence[Param] = ()) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
        """A read in the compact form: column names, rows as arrays, D1's meta."""
        ...

    def bookmark(self) -> str:
        """A restore point for the database as it is now (D1 Time Travel; a backup copy locally)."""
        ...

    def close(self) -> None: ...


def encode_param(value: Param, *, index: int | None = None) -> str | None:
    """A parameter as D1's API carries it: a string, or null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise D1LimitError(f"cannot bind non-finite number {value!r}", statement_index=index)
        return repr(value)
    if isinstance(value, str):
        return value
    raise D1LimitError(
        f"cannot bind a {type(value).__name__} parameter (BLOBs must be inlined as X'..' literals)",
        statement_index=index,
    )


def check_statement(stmt: Statement, index: int) -> None:
    """Refuse what D1 would refuse, before sending it, naming the statement."""
    if len(stmt.params) > MAX_BOUND_PARAMS:
        raise D1LimitError(
            f"statement has {len(stmt.params)} bound parameters, D1 allows {MAX_BOUND_PARAMS}",
            statement_index=index,
        )
    size = len(stmt.sql.encode())
    if size > MAX_STATEMENT_BYTES:
        raise D1LimitError(f"statement is {size} bytes long, D1 allows {MAX_STATEMENT_BYTES}", statement_index=index)


def encode_statements(statements: Sequence[Statement]) -> list[dict[str, Any]]:
    """Check limits and encode statements as API query objects."""
    out = []
    for i, stmt in enumerate(statements):
        check_statement(stmt, i)
        out.append({"sql": stmt.sql, "params": [encode_param(p, index=i) for p in stmt.params]})
    return out


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on 429, 5xx and connection errors: exponential backoff with jitter, `Retry-After` honoured.

    A retried batch may already have been applied by D1 before the connection failed; the engine makes
    every statement idempotent so a replay is harmless.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_delay)
            except ValueError:
                pass
        return min(self.base_delay * (2**attempt), self.max_delay) * (0.5 + random.random() / 2)


class HttpD1Client:
    """D1 over Cloudflare's HTTP API: `POST {base}/accounts/{account}/d1/database/{db}/query`."""

    def __init__(
        self,
        *,
        account_id: str,
        database_id: str,
        api_token: str,
        base_url: str = "https://api.cloudflare.com/client/v4",
        timeout: float = 35.0,
        retry: RetryPolicy | None = None,
        sleep: Any = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not (account_id and database_id and api_token):
            raise D1Error("the D1 HTTP backend needs an account id, a database id and an API token")
        self._token = api_token
        self._path = f"/accounts/{account_id}/d1/database/{database_id}"
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        # Redirects are never followed: a redirect could carry the bearer token to another host.
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
            transport=transport,
        )
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        if not statements:
            return []
        body = encode_statements(statements)
        payload: dict[str, Any] = body[0] if len(body) == 1 else {"batch": body}
        return self._post("query", payload, single=len(body) == 1)

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[QueryResult]:
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        return self._post("query", encoded, single=True)

    def raw(self, sql: str, params: Sequence[Param] = ()) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
        """A read through `/raw`: column names, rows as arrays (compact), meta."""
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        data = self._send("raw", encoded, single=True)
        last = data[-1]
        res = last.get("results") or {}
        return list(res.get("columns") or []), list(res.get("rows") or []), dict(last.get("meta") or {})

    def bookmark(self) -> str:
        """The current D1 Time Travel bookmark (`GET .../time_travel/bookmark`); restore with
        `wrangler d1 time-travel restore <db> --bookmark=<bookmark>`."""
        attempt = 0
        while True:
            try:
                self.requests += 1
                resp = self._http.get(f"{self._path}/time_travel/bookmark")
            except httpx.TransportError as e:
                err = D1Error(f"D1 HTTP API unreachable: {type(e).__name__}", retryable=True)
            else:
                if resp.status_code == 200 and resp.json().get("success") is not False:
                    return str((resp.json().get("result") or {}).get("bookmark"))
                err = self._error(resp, single=False)
            attempt += 1
            if not err.retryable or attempt >= self._retry.attempts:
                raise err
            self._sleep(self._retry.delay(attempt - 1, None))

    def _post(self, route: str, payload: dict[str, Any], *, single: bool) -> list[QueryResult]:
        data = self._send(route, payload, single=single)
        return [QueryResult(list(r.get("results") or []), dict(r.get("meta") or {})) for r in data]

    def _send(self, route: str, payload: dict[str, Any], *, single: bool) -> list[dict[str, Any]]:
        attempt = 0
        while True:
            try:
                self.requests += 1
                resp = self._http.post(f"{self._path}/{route}", json=payload)
            except httpx.TransportError as e:
                err = D1Error(f"D1 HTTP API unreachable: {type(e).__name__}", retryable=True)
                retry_after = None
            else:
                if resp.status_code == 200:
                    data = resp.json()
                    if data.get("success") is not False:
                        return list(data.get("result") or [])
                err = self._error(resp, single=single)
                retry_after = resp.headers.get("retry-after")
            attempt += 1
            if not err.retryable or attempt >= self._retry.attempts:
                raise err
            wait = self._retry.delay(attempt - 1, retry_after)
            log.warning("D1 request failed (%s); retry %d/%d in %.1fs", err, attempt, self._retry.attempts - 1, wait)
            self._sleep(wait)

    def _error(self, resp: httpx.Response, *, single: bool) -> D1Error:
        status = resp.status_code
        code, message = None, resp.reason_phrase or "error"
        try:
            errors = resp.json().get("errors") or []
            if errors:
                code, message = errors[0].get("code"), str(errors[0].get("message"))
        except ValueError:
            pass
        message = message.replace(self._token, "***")[:500]
        retryable = status == 429 or status >= 500
        hint = {
            401: " (check CLOUDFLARE_API_TOKEN and its D1 permission)",
            404: " (check the account and database ids)",
        }
        index = 0 if single and code == 7500 else None
        return D1Error(
            f"D1 HTTP API returned {status}, code {code}: {message}{hint.get(status, '')}",
            statement_index=index,
            status=status,
            code=code,
            retryable=retryable,
        )
