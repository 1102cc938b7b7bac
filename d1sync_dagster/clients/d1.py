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
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from d1sync_dagster.clients.d1_errors import HINTS, classify
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

    def restore(self, bookmark: str) -> str:
        """Return the database to a restore point; returns a bookmark of the state just before."""
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
    """Retries of temporary failures: exponential backoff with jitter, `Retry-After` honoured.

    A 429 means the API's budget (1,200 requests per 5 minutes per user or token; past it every call is
    refused for 5 minutes) is spent: its `Retry-After` is waited out once when it is at most
    `max_wait`, otherwise the request fails at once with the time it may be tried again (`retry_at`), so
    nothing keeps knocking during a lockout. A retried batch may already have been applied by D1 before the
    connection failed; the engine makes every statement idempotent so a replay is harmless.
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    #: The longest wait for the API's budget (a 429's Retry-After, or pacing from the Ratelimit header).
    max_wait: float = 330.0

    def delay(self, attempt: int) -> float:
        return min(self.base_delay * (2**attempt), self.max_delay) * (0.5 + random.random() / 2)


_RATELIMIT = re.compile(r"\br=(\d+)(?:.*?\bt=(\d+))?")
_POLICY = re.compile(r"\bq=(\d+)")


@dataclass
class Budget:
    """What the API's `Ratelimit` and `Ratelimit-Policy` headers said last: requests left, when the window
    resets (monotonic seconds), the window's quota."""

    remaining: int | None = None
    resets_at: float | None = None
    quota: int | None = None

    def update(self, headers: httpx.Headers, now: float) -> None:
        m = _RATELIMIT.search(headers.get("ratelimit") or "")
        if m:
            self.remaining = int(m.group(1))
            self.resets_at = now + int(m.group(2)) if m.group(2) else None
        p = _POLICY.search(headers.get("ratelimit-policy") or "")
        if p:
            self.quota = int(p.group(1))

    def wait(self, now: float) -> float:
        """Seconds to wait before the next request: none while requests are left beyond a small reserve
        (kept for wrangler and the dashboard, which share the budget), else until the window resets."""
        if self.remaining is None or self.resets_at is None:
            return 0.0
        reserve = max(2, (self.quota or 1200) // 50)
        return max(0.0, self.resets_at - now) if self.remaining <= reserve else 0.0

    def spacing(self, now: float, share: float) -> float:
        """Seconds between requests that spend `share` of the requests left (beyond the reserve) evenly
        until the window resets; 0 while the headers said nothing."""
        if self.remaining is None or self.resets_at is None:
            return 0.0
        reserve = max(2, (self.quota or 1200) // 50)
        allowed = max((self.remaining - reserve) * share, 1.0)
        return max(0.0, self.resets_at - now) / allowed


@contextmanager
def sharing(clients: Iterable[Any], share: float) -> Iterator[None]:
    """Let the HTTP clients among `clients` spend only `share` of the API's budget meanwhile."""
    paced = [c for c in clients if isinstance(c, HttpD1Client)]
    before = [c.share for c in paced]
    for c in paced:
        c.share = share
    try:
        yield
    finally:
        for c, s in zip(paced, before, strict=True):
            c.share = s


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
        clock: Any = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not (account_id and database_id and api_token):
            raise D1Error("the D1 HTTP backend needs an account id, a database id and an API token")
        self._token = api_token
        self._path = f"/accounts/{account_id}/d1/database/{database_id}"
        self._retry = retry or RetryPolicy()
        self._sleep, self._clock = sleep, clock
        # Redirects are never followed: a redirect could carry the bearer token to another host.
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
            transport=transport,
        )
        #: Every request sent (retries and bisection included): they all count against the API's budget.
        self.requests = 0
        self.budget = Budget()
        #: The share of what is left of the API's budget this client spends, evenly over the window (below 1:
        #: a long read such as verify or reconcile, which leaves the rest to the apply that shares the token).
        self.share = 1.0
        self._last_sent: float | None = None

    def close(self) -> None:
        self._http.close()

    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        if not statements:
            return []
        body = encode_statements(statements)
        payload: dict[str, Any] = body[0] if len(body) == 1 else {"batch": body}
        return self._results(self._call("POST", "query", payload, single=len(body) == 1), single=len(body) == 1)

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[QueryResult]:
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        return self._results(self._call("POST", "query", encoded, single=True), single=True)

    def raw(self, sql: str, params: Sequence[Param] = ()) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
        """A read through `/raw`: column names, rows as arrays (compact), meta."""
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        data = self._call("POST", "raw", encoded, single=True)
        self._check_results(data, single=True)
        last = data[-1]
        res = last.get("results") or {}
        return list(res.get("columns") or []), list(res.get("rows") or []), dict(last.get("meta") or {})

    def bookmark(self) -> str:
        """The current D1 Time Travel bookmark (`GET .../time_travel/bookmark`); restore with
        `d1sync restore --bookmark <bookmark>` (or wrangler's `d1 time-travel restore`)."""
        result = self._call("GET", "time_travel/bookmark", None, single=False)
        bookmark = result.get("bookmark") if isinstance(result, dict) else None
        if not isinstance(bookmark, str) or not bookmark:
            raise D1Error("the D1 API returned no Time Travel bookmark", kind="temporary")
        return bookmark

    def restore(self, bookmark: str) -> str:
        """Restore the database to `bookmark` (`POST .../time_travel/restore`); returns the bookmark of the
        state just before the restore, which undoes it."""
        result = self._call("POST", "time_travel/restore", None, single=False, params={"bookmark": bookmark})
        before = result.get("previous_bookmark") if isinstance(result, dict) else None
        return str(before or "")

    def _results(self, data: Any, *, single: bool) -> list[QueryResult]:
        self._check_results(data, single=single)
        return [QueryResult(list(r.get("results") or []), dict(r.get("meta") or {})) for r in data]

    def _check_results(self, data: Any, *, single: bool) -> None:
        """A 200 whose result list is not one result per statement, or holds `success: false`, is an error."""
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise D1Error("the D1 API answered 200 without a result list", kind="temporary")
        for i, r in enumerate(data):
            if r.get("success") is False:
                message = str(r.get("error") or r.get("message") or "a statement failed")
                message = message.replace(self._token, "***")[:500]
                raise D1Error(
                    f"D1 HTTP API returned a failed result: {message}",
                    statement_index=0 if single else i,
                    status=200,
                    kind=classify(200, None, message),
                )

    def _call(
        self, method: str, route: str, payload: Any, *, single: bool, params: dict[str, str] | None = None
    ) -> Any:
        """One API call with its retries, paced by the API's budget; returns the envelope's `result`."""
        attempt = 0
        while True:
            self._pace()
            try:
                self.requests += 1
                resp = self._http.request(method, f"{self._path}/{route}", json=payload, params=params)
            except httpx.TransportError as e:
                err = D1Error(f"D1 HTTP API unreachable: {type(e).__name__}", kind="unreachable")
                retry_after = None
            else:
                self.budget.update(resp.headers, self._clock())
                if resp.status_code == 200:
                    data = _json(resp)
                    if isinstance(data, dict) and data.get("success") is not False:
                        return data.get("result")
                err = self._error(resp, single=single)
                retry_after = _seconds(resp.headers.get("retry-after"))
            attempt += 1
            if err.kind == "rate_limited":
                wait = retry_after if retry_after is not None else self._retry.delay(attempt - 1)
                if wait > self._retry.max_wait or attempt >= self._retry.attempts:
                    err.retry_at = time.time() + wait
                    raise err
            elif not err.retryable or attempt >= self._retry.attempts:
                raise err
            else:
                wait = min(retry_after, self._retry.max_delay) if retry_after else self._retry.delay(attempt - 1)
            log.warning("D1 request failed (%s); retry %d/%d in %.1fs", err, attempt, self._retry.attempts - 1, wait)
            self._sleep(wait)

    def _pace(self) -> None:
        """Wait for the budget's window to reset when the last answer said it is (nearly) spent; with a
        `share` below 1, also space requests so that at most that share of what is left is spent before the
        window resets."""
        now = self._clock()
        wait = self.budget.wait(now)
        if wait <= 0 and self.share < 1.0:
            spacing = self.budget.spacing(now, self.share)
            if spacing and self._last_sent is not None and self._last_sent + spacing > now:
                self._sleep(self._last_sent + spacing - now)
            self._last_sent = self._clock()
            return
        if wait <= 0:
            return
        if wait > self._retry.max_wait:
            raise D1Error(
                f"the D1 API's request budget is spent for {wait:.0f} s more",
                kind="rate_limited",
                retry_at=time.time() + wait,
            )
        log.warning("the D1 API's request budget is nearly spent; waiting %.0f s for it to reset", wait)
        self._sleep(wait)
        self.budget.remaining = None

    def _error(self, resp: httpx.Response, *, single: bool) -> D1Error:
        status = resp.status_code
        code, message = None, resp.reason_phrase or "error"
        data = _json(resp)
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code"), str(errors[0].get("message"))
        message = message.replace(self._token, "***")[:500]
        kind = classify(status, code if isinstance(code, int) else None, message)
        index = 0 if single and kind == "sql" else None
        return D1Error(
            f"D1 HTTP API returned {status}, code {code}: {message}{HINTS.get(kind, '')}",
            statement_index=index,
            status=status,
            code=code if isinstance(code, int) else None,
            kind=kind,
        )


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
