"""What an answer of Cloudflare's D1 API means, from its status, code and text (pure, no I/O).

D1 answers code 7500 for every failed query, temporary failures included, so the HTTP status says little:
a "Network connection lost." behind a 400 must never send good changes to the dead-letter queue. Only an
error SQLite raised for the statement's content (`...: SQLITE_CONSTRAINT`, `SQLITE_TOOBIG`, ...) is `sql`;
an answer that is not recognised is `temporary`, so the worst a new message text can do is stop a run.
The texts are those of Cloudflare's D1 error list (developers.cloudflare.com/d1/observability/debug-d1).
"""

from __future__ import annotations

import re

#: D1 reset or lost the database for a moment: retry the same request.
_TEMPORARY = (
    "network connection lost",
    "reset because its code was updated",
    "caused object to be reset",
    "cannot resolve d1 db",
    "internal error",
    "client disconnected",
    "durable object",
    "try again",
)
#: D1 is overloaded or reset a query for its CPU, memory or time: back off, send less per request.
_OVERLOADED = (
    "overloaded",
    "requests queued for too long",
    "too many requests queued",
    "cpu time limit",
    "memory limit",
    "time limit",
    "exceeded timeout",
    "execution timeout",
)
#: A plan's daily limits (reported through the REST API since 2026-09) or the database's size.
_QUOTA = ("daily limit", "daily read", "daily write", "quota", "database or disk is full", "sqlite_full")
#: SQLite result codes that are about the moment, not about the statement. A read-only database (during a
#: restore, maintenance, or a file the process may not write) refuses every write alike: never the data's fault.
_SQLITE_TEMPORARY = (
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_NOMEM", "SQLITE_INTERRUPT", "SQLITE_READONLY",
)  # fmt: skip
_SQLITE_CODE = re.compile(r"SQLITE_[A-Z_]+")


def classify(status: int, code: int | None, message: str) -> str:
    """The `D1Error.kind` of an API answer (see `errors.D1Error`)."""
    text = message.lower()
    if status == 429:
        return "rate_limited"
    if status in (401, 403) or code in (10000, 10001):
        return "auth"
    if status == 404 or code == 7404:
        return "not_found"
    if status == 413:
        return "limit"  # the request body is too large: a planner limit, not a change's fault
    if any(p in text for p in _QUOTA):
        return "quota"
    if any(p in text for p in _OVERLOADED):
        return "overloaded"
    if status >= 500 or any(p in text for p in _TEMPORARY):
        return "temporary"
    sqlite = _SQLITE_CODE.search(message)
    if sqlite:
        return "temporary" if sqlite.group(0).startswith(_SQLITE_TEMPORARY) else "sql"
    if 300 <= status < 500 and code != 7500:
        return "request"  # a redirect, a malformed request, an unknown route: retrying changes nothing
    return "temporary"  # a query error we do not recognise: never dead-letter on it


#: What to tell the user, by kind.
HINTS = {
    "auth": " (check CLOUDFLARE_API_TOKEN and its D1 permission: it needs D1 Edit on this account)",
    "not_found": " (check the account and database ids: CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_D1_DATABASE_ID)",
    "quota": " (a D1 limit of the plan or of the database is reached: nothing more can be written until it "
    "resets or the plan changes; the changes stay queued)",
    "overloaded": " (D1 is overloaded: d1sync backs off and sends less; the changes stay queued)",
}
