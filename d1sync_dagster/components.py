"""`D1SyncComponent`: d1sync as a Dagster Component, so that one or several instances live in a user's code
location next to their own assets, each configured in YAML (`defs.yaml`) and loaded by `dg`:

    type: d1sync_dagster.components.D1SyncComponent
    attributes:
      schema_file: schema.json          # relative to this defs.yaml
      targets_file: targets.json        # optional: several D1 databases
      key_prefix: [edge]                # optional: before every asset key, job and sensor name
      postgres_resource_key: postgres_edge   # optional (a single target): the resources' keys
      d1_resource_key: d1_edge

Two instances need different `key_prefix` values (or different targets) so their names do not collide.
Settings that are secrets stay in the environment (`DATABASE_URL`, the Cloudflare variables or the
variables a targets file names), as everywhere in d1sync.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from d1sync_dagster.definitions import build_definitions


class D1SyncComponent(dg.Component, dg.Model, dg.Resolvable):
    """Replicates the tables of `schema_file` from Postgres (PGMQ) into Cloudflare D1."""

    schema_file: str = Field(description="schema.json, relative to the component's folder")
    targets_file: str | None = Field(default=None, description="targets.json (several D1 databases)")
    key_prefix: list[str] = Field(default_factory=list, description="put before every asset key and name")
    postgres_resource_key: str = Field(default="postgres", description="resource key of the Postgres resource")
    d1_resource_key: str = Field(default="d1", description="resource key of the D1 resource")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        folder = context.path
        return build_definitions(
            str(folder / self.schema_file),
            targets_file=str(folder / self.targets_file) if self.targets_file else None,
            prefix=self.key_prefix,
            resource_keys=None if self.targets_file else (self.postgres_resource_key, self.d1_resource_key),
        )
