"""`init-schema`: write a `schema.json` from a live Postgres database.

Type mapping (Postgres -> D1): `core/pgtypes.py`. A column of a type with no D1 type is left out with a
note, as are tables without a primary key, expression or partial indexes, and tables over D1's 100 columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.pgtypes import d1_type
from d1sync_dagster.errors import SchemaError
from d1sync_dagster.schema import MAX_COLUMNS, check_identifier, parse_schema


@dataclass
class Introspection:
    schema: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def introspect(pg: PgmqClient, *, tables: list[str] | None = None, schema_name: str = "public") -> Introspection:
    """Describe `tables` (default every table of `schema_name`) as a validated `schema.json` object."""
    out = Introspection()
    names = tables or [
        r[0]
        for r in pg.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.relname",
            [schema_name],
        )
    ]
    for name in names:
        rel = pg.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            [schema_name, name],
        )
        if not rel:
            raise SchemaError(f"table {schema_name}.{name} does not exist")
        entry = _table(pg, rel[0][0], f"{schema_name}.{name}", out.notes)
        if entry is None:
            continue
        try:
            check_identifier(name)
        except ValueError as e:
            out.notes.append(f"{schema_name}.{name}: left out: {e}")
            continue
        if schema_name != "public":
            entry["sourceSchema"] = schema_name
        out.schema[name] = entry
    if out.schema:
        parse_schema(out.schema)  # what we write must load
    return out


def _table(pg: PgmqClient, oid: int, label: str, notes: list[str]) -> dict[str, Any] | None:
    cols = pg.execute(
        "SELECT a.attname, t.typname, t.typtype, t.typcategory = 'A', et.typname "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_type et ON et.oid = t.typelem "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        [oid],
    )
    key = [
        r[0]
        for r in pg.execute(
            "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord",
            [oid],
        )
    ]
    if not key:
        notes.append(f"{label}: left out: no primary key (d1sync needs one to address rows)")
        return None
    columns: dict[str, str] = {}
    for attname, typname, typtype, is_array, _elem in cols:
        mapped = d1_type(typname, typtype, bool(is_array))
        if mapped is None:
            notes.append(f"{label}.{attname}: left out: no D1 type for Postgres type {typname}")
            continue
        try:
            check_identifier(attname)
        except ValueError as e:
            notes.append(f"{label}.{attname}: left out: {e}")
            continue
        columns[attname] = mapped
    missing_key = [k for k in key if k not in columns]
    if missing_key:
        notes.append(f"{label}: left out: key column(s) {missing_key} could not be mapped")
        return None
    bad_key = [k for k in key if columns[k] in ("JSON", "REAL")]
    if bad_key:
        notes.append(f"{label}: left out: key column(s) {bad_key} map to JSON or REAL, which cannot be keys")
        return None
    if len(columns) > MAX_COLUMNS:
        notes.append(f"{label}: left out: {len(columns)} columns, D1 allows {MAX_COLUMNS}")
        return None
    indexes = []
    by_num = {r[0]: r[1] for r in pg.execute("SELECT attnum, attname FROM pg_attribute WHERE attrelid = %s", [oid])}
    for idx_name, attnums, has_expr, is_partial in pg.execute(
        "SELECT ic.relname, i.indkey::int2[], i.indexprs IS NOT NULL, i.indpred IS NOT NULL FROM pg_index i "
        "JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = %s AND NOT i.indisprimary ORDER BY ic.relname",
        [oid],
    ):
        idx_cols = [by_num.get(n) for n in attnums]
        if has_expr or is_partial or 0 in attnums:
            notes.append(f"{label}: index {idx_name} left out: expression or partial index")
        elif not all(c in columns for c in idx_cols):
            notes.append(f"{label}: index {idx_name} left out: it uses a column that is not replicated")
        elif idx_cols != key[: len(idx_cols)]:
            indexes.append(idx_cols[0] if len(idx_cols) == 1 else idx_cols)
    entry: dict[str, Any] = {"primaryKey": key[0] if len(key) == 1 else key, "columns": columns}
    if indexes:
        entry["indexes"] = indexes
    return entry
