"""D1 (SQLite) DDL from the schema: tables, indexes and the `_d1sync_meta` table.

Type mapping (declared SQLite types, so column affinity converts numeric text params exactly):
INTEGER -> INTEGER, BOOLEAN -> INTEGER (0/1), REAL -> REAL, TEXT -> TEXT, JSON -> TEXT (canonical JSON),
BLOB -> BLOB.

A table whose key is one INTEGER column keeps it as the rowid (`PRIMARY KEY("id")` on an INTEGER column is a
rowid alias); any other key makes a `WITHOUT ROWID` table, so the key is stored once instead of in the
table and again in an automatic index. No extra index is ever made on the key: each index costs one more
D1 row write per changed row.
"""

from __future__ import annotations

import hashlib

from d1sync_dagster.schema import ColumnType, Schema, Table
from d1sync_dagster.sql.quoting import ident

META_TABLE = "_d1sync_meta"

SQLITE_TYPES: dict[ColumnType, str] = {
    "INTEGER": "INTEGER",
    "BOOLEAN": "INTEGER",
    "REAL": "REAL",
    "TEXT": "TEXT",
    "JSON": "TEXT",
    "BLOB": "BLOB",
}


def uses_rowid(table: Table) -> bool:
    """True when the key is a single INTEGER column, which SQLite stores as the rowid."""
    return len(table.key) == 1 and table.columns[table.key[0]] == "INTEGER"


def create_table(table: Table) -> str:
    """`CREATE TABLE IF NOT EXISTS` for one table, key columns NOT NULL."""
    cols = []
    for name, typ in table.columns.items():
        null = " NOT NULL" if name in table.key else ""
        cols.append(f"{ident(name)} {SQLITE_TYPES[typ]}{null}")
    key = ", ".join(ident(k) for k in table.key)
    suffix = "" if uses_rowid(table) else " WITHOUT ROWID"
    return f"CREATE TABLE IF NOT EXISTS {ident(table.target)} ({', '.join(cols)}, PRIMARY KEY ({key})){suffix}"


def add_column(table: Table, column: str) -> str:
    """`ALTER TABLE ... ADD COLUMN` for a column new in `schema.json` (never a key column)."""
    return f"ALTER TABLE {ident(table.target)} ADD COLUMN {ident(column)} {SQLITE_TYPES[table.columns[column]]}"


def index_name(table: Table, columns: tuple[str, ...]) -> str:
    """Deterministic index name: readable prefix plus a hash of (table, columns) so names never collide."""
    digest = hashlib.sha256("\x00".join((table.target, *columns)).encode()).hexdigest()[:8]
    readable = "_".join((table.target, *columns))[:40]
    return f"idx_{readable}_{digest}"


def create_indexes(table: Table) -> list[str]:
    """`CREATE INDEX IF NOT EXISTS` for each secondary index of the table."""
    return [
        f"CREATE INDEX IF NOT EXISTS {ident(index_name(table, cols))} ON {ident(table.target)} "
        f"({', '.join(ident(c) for c in cols)})"
        for cols in table.indexes
    ]


def drop_table(table: Table) -> str:
    """`DROP TABLE IF EXISTS` (its indexes go with it)."""
    return f"DROP TABLE IF EXISTS {ident(table.target)}"


def create_meta_table() -> str:
    """The key/value table where d1sync records what it applied."""
    return (
        f"CREATE TABLE IF NOT EXISTS {ident(META_TABLE)} "
        "(key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
    )


def upsert_meta() -> str:
    """Record one key/value pair (bind key, value)."""
    return (
        f"INSERT INTO {ident(META_TABLE)} (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
    )


def schema_ddl(schema: Schema) -> list[str]:
    """Every statement that creates the D1 side of `schema` (idempotent)."""
    out = [create_meta_table()]
    for table in schema.tables:
        out.append(create_table(table))
        out.extend(create_indexes(table))
    return out
