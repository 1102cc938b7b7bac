"""What the planner hands to a D1 client: statements with positional parameters, and D1's limits.

Core vocabulary: the planner (`core/plan.py`, `core/chunks.py`) builds `Statement`s within these limits, and
every D1 backend (`clients/`) runs them and enforces the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass

#: D1 limits (https://developers.cloudflare.com/d1/platform/limits/).
MAX_BOUND_PARAMS = 100
MAX_STATEMENT_BYTES = 100_000
MAX_ROW_BYTES = 2_000_000

Param = str | int | float | bool | None


@dataclass(frozen=True)
class Statement:
    """One SQL statement and its positional parameters."""

    sql: str
    params: tuple[Param, ...] = ()
