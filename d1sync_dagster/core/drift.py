"""Drift: where a source table no longer has what `schema.json` says it replicates, and the fix for each.

Told from the catalog (what the table has now, `SourceColumn` by name) against what setup recorded when it
last installed capture (`d1sync.source_columns`: each replicated column's `attnum` and type). The attnum
survives a rename, so a missing column is told apart as renamed (another name has its attnum) or dropped.

- **dropped** or **renamed**: capture leaves the column out of the records (a renamed one's values travel
  under the new name), so applying them would write NULL for it: the table's changes are held.
- **retyped** to a type whose values the column's D1 type cannot take (`core/pgtypes.py`): held too,
  once a value fails to convert (values that still convert apply).
- **retyped** to a type the D1 type takes (int4 -> int8): named, nothing is held.

Each finding carries its fix: the `schema.json` edit, then `d1sync setup` (which renames the D1 column and
keeps its data, drops a dropped one, rebuilds a retyped one from Postgres, and replays the held changes).
Pure: no I/O (`engine/drift.py` reads the catalog and acts on the findings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from d1sync_dagster.core.pgtypes import d1_type, takes

Kind = Literal["dropped", "renamed", "retyped"]


@dataclass(frozen=True)
class SourceColumn:
    """A column of a source table as the catalog has it (or as setup recorded it)."""

    name: str
    attnum: int
    pg_type: str  # format_type, for people
    typname: str = ""  # the type's own name, for the mapping ("" when only recorded)
    typtype: str = "b"
    is_array: bool = False


@dataclass(frozen=True)
class Drift:
    """One column of `schema.json` that the source no longer has as it was."""

    table: str
    column: str
    kind: Kind
    detail: str
    fix: str
    #: Whether the table's changes are held while it lasts (else it is only worth knowing).
    holds: bool
    #: The new name of a renamed column.
    renamed_to: str | None = None

    def describe(self) -> str:
        return f"{self.table}.{self.column}: {self.detail}. Fix: {self.fix}"


def find_drift(
    name: str,
    columns: Mapping[str, str],
    key: tuple[str, ...],
    live: Mapping[str, SourceColumn],
    recorded: Mapping[str, SourceColumn],
) -> list[Drift]:
    """The drift of one table: its `schema.json` `columns` (name -> D1 type) and `key` against the source's
    `live` columns and what setup `recorded`."""
    by_attnum = {c.attnum: c for c in live.values()}
    out: list[Drift] = []
    setup = "then run d1sync setup"
    for col, d1 in columns.items():
        where = f'"{name}".columns of schema.json'
        also = " and primaryKey" if col in key else ""
        now = live.get(col)
        if now is None:
            was = recorded.get(col)
            new = by_attnum.get(was.attnum) if was is not None else None
            if new is not None and new.name not in columns:
                out.append(
                    Drift(
                        name,
                        col,
                        "renamed",
                        f'renamed to "{new.name}" in Postgres; changes to {name} are held until schema.json follows',
                        f'rename "{col}" to "{new.name}" in {where} (and in its indexes{also}), {setup}: D1 renames '
                        "the column and keeps its data, and the held changes apply",
                        True,
                        new.name,
                    )
                )
                continue
            fix = (
                f'"{col}" is part of the primary key: give "{name}" the key the source table has now in schema.json, '
                f"{setup}"
                if col in key
                else f'remove "{col}" from {where} (and from its indexes), {setup}: D1 drops the column too, and the '
                "held changes apply"
            )
            out.append(
                Drift(
                    name,
                    col,
                    "dropped",
                    f"no longer in the Postgres table; changes to {name} are held until schema.json follows",
                    fix,
                    True,
                )
            )
            continue
        was = recorded.get(col)
        if not now.typname:
            continue
        if not takes(d1, now.typname, now.typtype, now.is_array):
            suggested = d1_type(now.typname, now.typtype, now.is_array) or "TEXT"
            out.append(
                Drift(
                    name,
                    col,
                    "retyped",
                    f"is {now.pg_type} in Postgres"
                    + (f" (was {was.pg_type})" if was is not None and was.pg_type != now.pg_type else "")
                    + f", which schema.json's {d1} cannot always take; changes to {name} are held once a value "
                    "does not convert",
                    f'set "{col}" to "{suggested}" in {where}, {setup}: D1 rebuilds the table from Postgres, and '
                    "the held changes apply",
                    True,
                )
            )
        elif was is not None and was.pg_type != now.pg_type:
            out.append(
                Drift(
                    name,
                    col,
                    "retyped",
                    f"changed type from {was.pg_type} to {now.pg_type} in Postgres; its values still convert to {d1}",
                    "nothing is needed; run d1sync setup to record the new type",
                    False,
                )
            )
    return out
