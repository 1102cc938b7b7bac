"""What the planner hands to a D1 client: statements with positional parameters, and D1's limits.

Core vocabulary: the planner (`core/plan.py`, `core/chunks.py`) builds `Statement`s within these limits, and
every D1 backend (`clients/`) runs them and enforces the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass

#: D1 limits (https://developers.cloudflare.com/d1/platform/limits/).
MAX_BOUND_PARAMS = 100
MAX_STATEMENT_BYTES = 100_000
#: The largest string, BLOB or row.
MAX_ROW_BYTES = 2_000_000
#: Columns in a table, and in the result of a query.
MAX_RESULT_COLUMNS = 100
MAX_FUNCTION_ARGS = 32
#: Depth of an expression tree (measured on D1's engine: "Expression tree is too large (maximum depth 100)").
MAX_EXPR_DEPTH = 100

Param = str | int | float | bool | None


@dataclass(frozen=True)
class Statement:
    """One SQL statement and its positional parameters."""

    sql: str
    params: tuple[Param, ...] = ()
