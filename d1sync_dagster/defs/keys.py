"""Names and keys of one target's definitions, and where they find their resources.

A target is one D1 database fed by one queue (`targets.py`). With a single target (today's setup, and the
default) every name is as it always was: assets `d1/<table>`, job `d1sync_apply`, resources `postgres` and
`d1`. With several, each target's names carry it (`d1/<target>/<table>`, `d1sync_apply_<target>`, resources
`postgres_<target>`, `d1_<target>`), so several targets (or several d1sync instances, with a key `prefix`,
in a user's own project) live in one code location. The Postgres source assets `postgres/<schema>/<table>`
are the same for every target that replicates the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg

from d1sync_dagster.schema import Table


@dataclass(frozen=True)
class Wiring:
    target: str | None = None
    postgres_key: str = "postgres"
    d1_key: str = "d1"
    #: Put before every asset key (an instance embedded in a larger project).
    prefix: tuple[str, ...] = ()

    def asset_key(self, table: Table) -> dg.AssetKey:
        return dg.AssetKey([*self.prefix, "d1", *([self.target] if self.target else []), table.target])

    def source_key(self, table: Table) -> dg.AssetKey:
        return dg.AssetKey([*self.prefix, "postgres", table.spec.source_schema, table.name])

    def name(self, base: str) -> str:
        """A job, op, sensor or schedule name, unique per target and prefix."""
        return "_".join([*self.prefix, base, *([self.target] if self.target else [])])

    @property
    def group(self) -> str:
        return self.name("d1")

    @property
    def resource_keys(self) -> set[str]:
        return {self.postgres_key, self.d1_key}

    def resources(self, context: Any) -> tuple[Any, Any]:
        """(PostgresResource, D1Resource) of this target, from a Dagster context."""
        return getattr(context.resources, self.postgres_key), getattr(context.resources, self.d1_key)


DEFAULT = Wiring()


def asset_key(table: Table) -> dg.AssetKey:
    return DEFAULT.asset_key(table)


def source_key(table: Table) -> dg.AssetKey:
    return DEFAULT.source_key(table)
