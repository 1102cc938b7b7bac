"""The part of a `Schema` that decoding and planning read, as plain objects (no pydantic).

The planner process (`engine/planner.py`) receives the schema as a `PlainSchema`: unpickling the validated
`Schema` would import pydantic and build the schema's models, which costs that process more memory (about
19 MB) than a batch does. Everything in `core` that takes a `Schema` or a `Table` reads only what these
have (`tables`, `by_name`, `table()`; `name`, `target`, `key`, `columns`), so it takes them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from d1sync_dagster.errors import table_named

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema


@dataclass(frozen=True, eq=False)
class PlainTable:
    name: str
    target: str
    key: tuple[str, ...]
    columns: dict[str, str]


@dataclass(frozen=True, eq=False)
class PlainSchema:
    tables: tuple[PlainTable, ...]
    by_name: dict[str, PlainTable] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tables})

    @classmethod
    def of(cls, schema: Schema) -> PlainSchema:
        return cls(tuple(PlainTable(t.name, t.target, tuple(t.key), dict(t.columns)) for t in schema.tables))

    def table(self, name: str) -> PlainTable:
        return table_named(self.by_name, name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tables]
