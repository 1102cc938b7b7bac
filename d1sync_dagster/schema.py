"""`schema.json`: which Postgres tables and columns reach D1, with which types and indexes.

The seed format stays valid (`{table: {primaryKey, columns: {name: INTEGER|TEXT|BOOLEAN|JSON}, indexes}}`).
Optional extensions: a composite `primaryKey` (a list), the types REAL and BLOB, `target` (the D1 table
name, default the source name), `sourceSchema` (the Postgres schema, default `public`), and, for the Dagster
asset only, `owners` (e-mail addresses or `team:<name>`) and `tags` (string to string).

Validation is strict and happens once, at load; every message names the table and the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator, model_validator

from d1sync_dagster.errors import SchemaError, table_named

ColumnType = Literal["INTEGER", "TEXT", "BOOLEAN", "JSON", "REAL", "BLOB"]

#: D1 allows at most 100 columns per table.
MAX_COLUMNS = 100
#: Postgres truncates identifiers longer than 63 bytes, so a longer name could never match its source.
MAX_IDENTIFIER_BYTES = 63
#: Key types that compare exactly in both databases.
KEY_TYPES = ("INTEGER", "TEXT", "BOOLEAN", "BLOB")
#: Names d1sync keeps for itself in D1.
RESERVED_PREFIXES = ("sqlite_", "_cf_", "_d1sync")


def check_identifier(name: str) -> str:
    """Refuse names that cannot be quoted safely in both Postgres and SQLite."""
    if not name:
        raise ValueError("identifier is empty")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"identifier {name[:20]!r}... is longer than {MAX_IDENTIFIER_BYTES} bytes")
    for bad, what in (("\x00", "a NUL character"), ('"', "a double quote"), ("'", "a single quote")):
        if bad in name:
            raise ValueError(f"identifier {name!r} contains {what}")
    if name != name.strip():
        raise ValueError(f"identifier {name!r} has leading or trailing spaces")
    if name.lower().startswith(RESERVED_PREFIXES):
        raise ValueError(f"identifier {name!r} uses a reserved prefix ({', '.join(RESERVED_PREFIXES)})")
    return name


Identifier = Annotated[str, Field(min_length=0)]


class TableSpec(BaseModel):
    """One replicated table."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    primary_key: tuple[Identifier, ...] = Field(alias="primaryKey")
    columns: dict[Identifier, ColumnType]
    indexes: tuple[tuple[Identifier, ...], ...] = ()
    target: Identifier | None = None
    source_schema: Identifier = Field(default="public", alias="sourceSchema")
    #: Shown on the table's Dagster asset only (not part of the replication, nor of the schema version).
    owners: tuple[str, ...] = ()
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("owners")
    @classmethod
    def _check_owners(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for owner in v:
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+|team:[A-Za-z0-9_.-]+", owner):
                raise ValueError(f"owners: {owner!r} is neither an e-mail address nor team:<name>")
        return v

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,63}", key):
                raise ValueError(f"tags: key {key!r} must be 1 to 63 letters, digits, '_', '.' or '-'")
            if not re.fullmatch(r"[A-Za-z0-9_.-]{0,63}", value):
                raise ValueError(
                    f"tags: value {value!r} of {key!r} must be at most 63 letters, digits, '_', '.' or '-'"
                )
        return v

    @field_validator("primary_key", mode="before")
    @classmethod
    def _key_as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("indexes", mode="before")
    @classmethod
    def _indexes_as_lists(cls, v: object) -> object:
        if isinstance(v, list):
            return [[i] if isinstance(i, str) else i for i in v]
        return v

    @field_validator("columns")
    @classmethod
    def _check_columns(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one column is required")
        if len(v) > MAX_COLUMNS:
            raise ValueError(f"{len(v)} columns, D1 allows at most {MAX_COLUMNS}")
        lowered = [c.lower() for c in v]
        if len(set(lowered)) != len(lowered):
            raise ValueError("column names differ only by case (SQLite treats them as one)")
        for name in v:
            check_identifier(name)
        return v

    @field_validator("target", "source_schema")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return None if v is None else check_identifier(v)

    @model_validator(mode="after")
    def _check_keys_and_indexes(self) -> TableSpec:
        if not self.primary_key:
            raise ValueError("primaryKey: at least one column is required")
        if len(set(self.primary_key)) != len(self.primary_key):
            raise ValueError("primaryKey: a column is listed twice")
        for col in self.primary_key:
            if col not in self.columns:
                raise ValueError(f"primaryKey: column {col!r} is not among columns")
            if self.columns[col] not in KEY_TYPES:
                raise ValueError(
                    f"primaryKey: column {col!r} has type {self.columns[col]}; key columns must be one of "
                    f"{', '.join(KEY_TYPES)}"
                )
        seen: set[tuple[str, ...]] = set()
        for idx in self.indexes:
            if not idx:
                raise ValueError("indexes: an index needs at least one column")
            for col in idx:
                if col not in self.columns:
                    raise ValueError(f"indexes: column {col!r} is not among columns")
            if len(set(idx)) != len(idx):
                raise ValueError(f"indexes: index {list(idx)} lists a column twice")
            if idx in seen:
                raise ValueError(f"indexes: index {list(idx)} is listed twice")
            seen.add(idx)
        return self

    def to_json(self) -> dict[str, object]:
        """The entry as it would appear in `schema.json` (canonical form)."""
        out: dict[str, object] = {
            "primaryKey": self.primary_key[0] if len(self.primary_key) == 1 else list(self.primary_key),
            "columns": dict(self.columns),
        }
        if self.indexes:
            out["indexes"] = [i[0] if len(i) == 1 else list(i) for i in self.indexes]
        if self.target is not None:
            out["target"] = self.target
        if self.source_schema != "public":
            out["sourceSchema"] = self.source_schema
        if self.owners:
            out["owners"] = list(self.owners)
        if self.tags:
            out["tags"] = dict(self.tags)
        return out

    def replicated_json(self) -> dict[str, object]:
        """`to_json` without what only Dagster shows (owners, tags): what the versions are hashed from."""
        out = self.to_json()
        out.pop("owners", None)
        out.pop("tags", None)
        return out


class _SchemaFile(RootModel[dict[Identifier, TableSpec]]):
    @field_validator("root")
    @classmethod
    def _check_tables(cls, v: dict[str, TableSpec]) -> dict[str, TableSpec]:
        if not v:
            raise ValueError("schema.json lists no tables")
        for name in v:
            check_identifier(name)
        targets = [(spec.target or name).lower() for name, spec in v.items()]
        if len(set(targets)) != len(targets):
            raise ValueError("two tables map to the same D1 table name")
        return v


class Table(BaseModel):
    """A validated table with its name; what the rest of d1sync passes around."""

    model_config = ConfigDict(frozen=True)

    name: str
    spec: TableSpec

    @property
    def target(self) -> str:
        return self.spec.target or self.name

    @property
    def key(self) -> tuple[str, ...]:
        return self.spec.primary_key

    @property
    def columns(self) -> dict[str, ColumnType]:
        return self.spec.columns

    @property
    def indexes(self) -> tuple[tuple[str, ...], ...]:
        """Secondary indexes to create. An index that is a prefix of the primary key is skipped: SQLite
        already serves it from the key, and a second copy would double D1 writes per row."""
        return tuple(i for i in self.spec.indexes if tuple(self.key[: len(i)]) != i)

    @property
    def version(self) -> str:
        """A short hash of this table's entry, used as the asset's code_version."""
        return _digest({self.name: self.spec.replicated_json()})


class Schema(BaseModel):
    """The whole `schema.json`, in file order."""

    model_config = ConfigDict(frozen=True)

    tables: tuple[Table, ...]

    @property
    def version(self) -> str:
        """A short hash of the canonical schema; recorded in D1 when applied."""
        return _digest({t.name: t.spec.replicated_json() for t in self.tables})

    @functools.cached_property
    def by_name(self) -> dict[str, Table]:
        return {t.name: t for t in self.tables}

    def table(self, name: str) -> Table:
        return table_named(self.by_name, name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tables]

    def to_json(self) -> dict[str, object]:
        return {t.name: t.spec.to_json() for t in self.tables}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def allowed_keys() -> list[str]:
    """The keys a table entry may have, as spelled in the file (from the model, so the list cannot go stale)."""
    return [f.alias or name for name, f in TableSpec.model_fields.items()]


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"{source}: {msg}")
            continue
        table, field = loc[0], ".".join(loc[1:])
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {', '.join(allowed_keys())})"
        where = f"table {table!r}" + (f", field {field!r}" if field else "")
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def parse_schema(data: object, *, source: str = "schema.json") -> Schema:
    """Validate parsed JSON and return the schema, or raise SchemaError naming the file (`source`), table
    and field."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: the top level must be an object of tables")
    try:
        parsed = _SchemaFile.model_validate(data)
    except ValidationError as e:
        raise SchemaError(_describe(e, source)) from None
    return Schema(tables=tuple(Table(name=n, spec=s) for n, s in parsed.root.items()))


def load_schema(path: str | Path) -> Schema:
    """Read and validate a `schema.json` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SchemaError(f"cannot read schema file {str(p)!r}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{p.name}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return parse_schema(data, source=p.name)
