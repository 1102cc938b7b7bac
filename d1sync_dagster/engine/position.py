"""Read-your-writes from Python: the position D1 recorded (`core/txns.py`), whether a source transaction
is in D1, waiting for it, and how fresh D1 is. The twin of `readers/position.ts` for Workers.

The write path gets its transaction id from Postgres in the same transaction as its writes (README,
"Has my write arrived?": `select d1sync.txid()` or `pg_current_xact_id()`). A sharded target records one
position per database: ask the database that holds the rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.core.txns import Snapshot
from d1sync_dagster.engine.status import d1_meta


@dataclass(frozen=True)
class Freshness:
    """The last position D1 recorded and its age (None before the first)."""

    position: str | None
    recorded_at: str | None
    age_seconds: float | None


def freshness(d1: D1Client) -> Freshness:
    meta = d1_meta(d1)
    at = meta.get("position_at")
    age = None if at is None else (datetime.now(UTC) - datetime.fromisoformat(at)).total_seconds()
    return Freshness(meta.get("position"), at, age)


def applied(d1: D1Client, xid: int) -> bool:
    """Whether source transaction `xid`'s effects are in D1 (one read of D1's bookkeeping)."""
    position = freshness(d1).position
    return position is not None and Snapshot.parse(position).visible(int(xid))


def wait_for_applied(d1: D1Client, xid: int, *, timeout_seconds: float = 10.0, poll_seconds: float = 0.1) -> bool:
    """Poll until `xid` is in D1 or the timeout passes; whether it arrived."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        if applied(d1, xid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
