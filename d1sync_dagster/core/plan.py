"""Net changes -> D1 statements within D1's limits, carrying as many rows per statement as they allow.

On the HTTP API the scarce resource is requests, so rows travel as validated, escaped SQLite literals
(integers as digits, so values beyond 2^53 stay exact; REAL as an exact power-of-two expression; text
quoted with '' doubling; BLOBs as X'..'), packed into multi-row statements up to D1's 100 KB statement
limit. A row too large for that is sent alone with its text values bound as parameters (parameters do not
count towards the statement's length). Every statement is idempotent, so replaying a batch after a crash is harmless:

- upsert: `INSERT ... VALUES (...), (...) ON CONFLICT (key) DO UPDATE SET c = excluded.c WHERE <changed>`
  (an unchanged row is not rewritten, so a replay writes nothing). When the batch knows the row before its
  first change (an UPDATE's old_record), only the columns that changed are assigned; the full row still
  travels, so a row missing from D1 is inserted whole, never silently skipped;
- delete: `DELETE FROM t WHERE key IN (...)` (row values for composite keys);
- truncate: `DELETE FROM t`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from d1sync_dagster.core.changes import Key, Row
from d1sync_dagster.core.coalesce import TableChanges
from d1sync_dagster.core.convert import SqlValue
from d1sync_dagster.core.statements import MAX_BOUND_PARAMS, MAX_ROW_BYTES, MAX_STATEMENT_BYTES, Param, Statement
from d1sync_dagster.sql.quoting import ident

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema, Table

Kind = Literal["truncate", "delete", "upsert"]

#: Upserts are packed up to this many bytes per statement, not up to D1's 100 KB: SQLite's cost per row of a
#: multi-row `VALUES` grows with the rows in the statement when values are expressions (the exact REAL
#: ratios). Measured here (SQLite 3.40, 100k rows of the benchmark table): 9.4 us/row at 1,111 rows per
#: statement (100 KB), 5.4 at 552, 4.2 at 273 (25 KB), 5.3 at 128. A row larger than this still gets a
#: statement of its own, up to the limit.
PACK_BYTES = 25_000


class PlanError(ValueError):
    """A row that no D1 statement can carry."""


@dataclass(frozen=True)
class Planned:
    """A statement and what it does: for which table, of which kind, how many rows."""

    table: str
    kind: Kind
    rows: int
    statement: Statement
    #: The shard database it goes to (`core/shards.py`); None: the target's own database.
    shard: str | None = None


def sql_literal(value: SqlValue) -> str:
    """A SQLite literal for a converted value."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):  # pragma: no cover - conversion never yields bools
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return real_literal(value)
    if isinstance(value, bytes):
        return "X'" + value.hex().upper() + "'"
    return "'" + value.replace("'", "''") + "'"


def real_literal(f: float) -> str:
    """An exact SQLite expression for a finite double.

    SQLite's decimal-to-double parsing is not correctly rounded (seen here: 87 of 20,000 random doubles came
    back different, in SQLite 3.40 and in D1; it divides in long double and rounds twice), so a
    non-integral REAL is written as its exact ratio `n.0/d` with `d` a power of two: `n.0` (at most 2**53)
    and `d` parse exactly, and one IEEE division of exact operands gives exactly the double. Values beyond
    that range scale by further powers of two, each step exact.
    """
    n, d = f.as_integer_ratio()  # d is a power of two; n is odd unless d == 1, so |n| < 2**53 when d > 1
    if d == 1 and abs(n) < 2**53:
        return f"{n}.0"
    if d <= 1 << 62:
        return f"({n}.0/{d})" if abs(n) < 2**53 else _scaled(f)
    return _scaled(f)


def _scaled(f: float) -> str:
    mant, exp = math.frexp(f)
    m, e = int(mant * (1 << 53)), exp - 53
    while m % 2 == 0:
        m //= 2
        e += 1
    parts = [f"{m}.0"]
    op, k = ("*" if e > 0 else "/"), abs(e)
    while k > 0:
        step = min(k, 62)
        parts.append(f"{op}{1 << step}")
        k -= step
    return "(" + "".join(parts) + ")"


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def row_problem(table: Table, row: Row) -> str | None:
    """Why no statement could carry this row, or None. Checked before planning so it can be dead-lettered."""
    # A UTF-8 character takes at most 4 bytes: rows far below the limits need no exact count.
    rough = 4 * sum([len(v) for v in row.values() if v.__class__ is str or v.__class__ is bytes]) + 24 * len(row)
    if rough < MAX_STATEMENT_BYTES // 2:
        return None
    total = sum(len(v) if isinstance(v, bytes) else _size(v) if isinstance(v, str) else 8 for v in row.values())
    if total > MAX_ROW_BYTES:
        return f"row is about {total} bytes, over D1's {MAX_ROW_BYTES}-byte row limit"
    # BLOBs can only travel inline; everything else can be bound when the row is large.
    inline = sum(2 * len(v) + 3 for v in row.values() if isinstance(v, bytes))
    if inline + _size(_upsert_head(table)) + _size(_upsert_tail(table)) + 64 * len(row) > MAX_STATEMENT_BYTES:
        return "BLOB values too large for one D1 statement (BLOBs travel as X'..' literals, limit 100 KB)"
    return None


def _upsert_head(table: Table) -> str:
    return _head(table.target, tuple(table.columns))


def _upsert_tail(table: Table, columns: frozenset[str] | None = None) -> str:
    """`ON CONFLICT` clause assigning `columns` (None: every non-key column) only where a value differs."""
    return _tail(table.target, tuple(table.columns), table.key, columns)


@functools.cache
def _head(target: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {ident(target)} ({', '.join(ident(c) for c in columns)}) VALUES "


@functools.cache
def _tail(target: str, all_columns: tuple[str, ...], key: tuple[str, ...], columns: frozenset[str] | None) -> str:
    keys = ", ".join(ident(k) for k in key)
    others = [c for c in all_columns if c not in key and (columns is None or c in columns)]
    if not others:
        return f" ON CONFLICT ({keys}) DO NOTHING"
    sets = ", ".join(f"{ident(c)} = excluded.{ident(c)}" for c in others)
    t = ident(target)
    changed = any_of([f"{t}.{ident(c)} IS NOT excluded.{ident(c)}" for c in others])
    return f" ON CONFLICT ({keys}) DO UPDATE SET {sets} WHERE {changed}"


def any_of(terms: list[str]) -> str:
    """`t1 OR t2 OR ...` as a balanced tree of parenthesised halves. A flat chain nests one level per term,
    and D1 refuses expressions deeper than `MAX_EXPR_DEPTH` (a 100-column upsert would be)."""
    if len(terms) <= 8:
        return " OR ".join(terms)
    mid = len(terms) // 2
    return f"({any_of(terms[:mid])}) OR ({any_of(terms[mid:])})"


def _int_literal(v: SqlValue) -> str:
    return "NULL" if v is None else str(v)


def _text_literal(v: SqlValue) -> str:
    return "NULL" if v is None else "'" + v.replace("'", "''") + "'"  # type: ignore[union-attr]


def _real(v: SqlValue) -> str:
    return "NULL" if v is None else real_literal(v)  # type: ignore[arg-type]


_LITERALS = {
    "INTEGER": _int_literal,
    "BOOLEAN": _int_literal,
    "TEXT": _text_literal,
    "JSON": _text_literal,
    "REAL": _real,
    "BLOB": sql_literal,
}


@functools.cache
def _literal_fns(columns: tuple[tuple[str, str], ...]) -> Callable[[Row], str]:
    """A function rendering a converted row as its `(v1,v2,..)` literal, generated for the columns: the
    literal rules of `_LITERALS` with integers and text inlined (one call per row, not one per value)."""
    env: dict[str, Any] = {f"f{i}": _LITERALS[t] for i, (_, t) in enumerate(columns)}
    lines, parts = ["def literal(r):"], []
    for i, (c, t) in enumerate(columns):
        lines.append(f"    v{i} = r[{c!r}]")
        if t in ("INTEGER", "BOOLEAN"):
            parts.append(f"('NULL' if v{i} is None else str(v{i}))")
        elif t in ("TEXT", "JSON"):
            parts.append(f'(\'NULL\' if v{i} is None else "\'" + v{i}.replace("\'", "\'\'") + "\'")')
        else:
            parts.append(f"f{i}(v{i})")
    lines.append("    return '(' + " + " + ',' + ".join(parts) + " + ')'")
    exec("\n".join(lines), env)  # noqa: S102 - column names are validated identifiers, quoted by repr
    return env["literal"]  # type: ignore[no-any-return]


def row_literal(table: Table, row: Row) -> str:
    """A converted row as the `(v1,v2,..)` literal the upserts carry, columns in schema order."""
    return _literal_fns(tuple(table.columns.items()))(row)


def _pack(head: str, tail: str, items: list[str], limit: int) -> Iterator[tuple[str, int]]:
    """Greedy packing of comma-separated items between head and tail, each statement within `limit` bytes
    (an item alone may exceed it; the caller keeps items within D1's limit)."""
    fixed = _size(head) + _size(tail)
    batch: list[str] = []
    size = fixed
    for item in items:
        n = _size(item) + 1
        if batch and size + n > limit:
            yield head + ",".join(batch) + tail, len(batch)
            batch, size = [], fixed
        batch.append(item)
        size += n
    if batch:
        yield head + ",".join(batch) + tail, len(batch)


def _bound_row(table: Table, row: Row, columns: frozenset[str] | None, limit: int) -> Statement:
    """One large row, its text values bound as parameters."""
    values: list[str] = []
    params: list[Param] = []
    for c in table.columns:
        v = row[c]
        if isinstance(v, str) and len(params) < MAX_BOUND_PARAMS:
            values.append("?")
            params.append(v)
        else:
            values.append(sql_literal(v))
    sql = _upsert_head(table) + "(" + ", ".join(values) + ")" + _upsert_tail(table, columns)
    if _size(sql) > limit:
        raise PlanError(f"a row of {table.name} does not fit in one D1 statement even with bound parameters")
    return Statement(sql, tuple(params))


def upsert_room(table: Table, limit: int = MAX_STATEMENT_BYTES) -> int:
    """Bytes a row literal must stay below to travel in a multi-row upsert of `table` within `limit`."""
    return limit - _size(_upsert_head(table)) - _size(_upsert_tail(table))


def plan_literals(table: Table, literals: list[str], *, limit: int = MAX_STATEMENT_BYTES) -> list[Planned]:
    """Full-row upserts of rendered row literals (each below `upsert_room`), packed like `plan_upserts`."""
    head, tail = _upsert_head(table), _upsert_tail(table)
    packed = _pack(head, tail, literals, min(limit, PACK_BYTES))
    return [Planned(table.name, "upsert", n, Statement(sql)) for sql, n in packed]


def plan_upserts(
    table: Table, rows: list[Row], *, columns: frozenset[str] | None = None, limit: int = MAX_STATEMENT_BYTES
) -> list[Planned]:
    """Multi-row upserts of `rows`, assigning `columns` on conflict (None: all non-key columns)."""
    head, tail = _upsert_head(table), _upsert_tail(table, columns)
    room = limit - _size(head) - _size(tail)
    small: list[str] = []
    large: list[Row] = []
    literal = _literal_fns(tuple(table.columns.items()))  # once, not per row
    for row in rows:
        lit = literal(row)
        if _size(lit) < room:
            small.append(lit)
        else:
            large.append(row)
    packed = _pack(head, tail, small, min(limit, PACK_BYTES))
    out = [Planned(table.name, "upsert", n, Statement(sql)) for sql, n in packed]
    out += [Planned(table.name, "upsert", 1, _bound_row(table, row, columns, limit)) for row in large]
    return out


def plan_deletes(table: Table, keys: list[Key], *, limit: int = MAX_STATEMENT_BYTES) -> list[Planned]:
    t = ident(table.target)
    if len(table.key) == 1:
        head, tail = f"DELETE FROM {t} WHERE {ident(table.key[0])} IN (", ")"
        items = [sql_literal(k[0]) for k in keys]
    else:
        cols = ", ".join(ident(c) for c in table.key)
        head, tail = f"DELETE FROM {t} WHERE ({cols}) IN (VALUES ", ")"
        items = ["(" + ", ".join(sql_literal(v) for v in k) + ")" for k in keys]
    return [Planned(table.name, "delete", n, Statement(sql)) for sql, n in _pack(head, tail, items, limit)]


def plan(schema: Schema, net: dict[str, TableChanges], *, limit: int = MAX_STATEMENT_BYTES) -> list[Planned]:
    """Statements for a batch's net changes: per table truncate, then deletes, then upserts."""
    out: list[Planned] = []
    for name, tc in net.items():
        table = schema.table(name)
        if tc.truncate:
            out.append(Planned(name, "truncate", 0, Statement(f"DELETE FROM {ident(table.target)}")))
        if tc.deletes:
            out += plan_deletes(table, _sorted(tc.deletes), limit=limit)
        # Rows are grouped by the columns that changed in the batch, so an update of a column no index
        # covers does not rewrite the indexes (D1 bills every index entry written).
        groups: dict[frozenset[str] | None, list[Row]] = {}
        for key in _sorted(tc.upserts):
            groups.setdefault(tc.changed_columns(key), []).append(tc.upserts[key])
        for columns, rows in groups.items():
            out += plan_upserts(table, rows, columns=columns, limit=limit)
    return out


def sorted_keys(keys: Iterable[Key]) -> list[Key]:
    """Keys in a deterministic order (`_sorted`), for planners outside this module (`core/staging.py`)."""
    return _sorted(keys)


def upsert_tail(table: Table) -> str:
    """The `ON CONFLICT` clause of a full-row upsert into `table` (`_upsert_tail`)."""
    return _upsert_tail(table)


def _sorted(keys: Iterable[Key]) -> list[Key]:
    """Keys in a deterministic order (plain sort; mixed value types fall back to a total order)."""
    keys = list(keys)
    try:
        return sorted(keys)  # type: ignore[type-var]
    except TypeError:
        return sorted(keys, key=_sort_key)


def _sort_key(key: Key) -> tuple[tuple[int, object], ...]:
    """A total order over keys of mixed SQLite values, so statements (and their sizes) are deterministic."""
    return tuple((0, v) if isinstance(v, int) else (1, v) if isinstance(v, str) else (2, repr(v)) for v in key)


def requests(planned: list[Planned], *, max_bytes: int = 2_000_000, max_statements: int = 500) -> list[list[Planned]]:
    """Group statements into D1 requests (one `{"batch": [...]}` each) within a body budget."""
    out: list[list[Planned]] = []
    cur: list[Planned] = []
    size = 0
    for p in planned:
        n = _size(p.statement.sql) + sum(_size(str(x)) for x in p.statement.params)
        if cur and (size + n > max_bytes or len(cur) >= max_statements):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out
