"""Asset keys: `d1/<table>` for a D1 table, `postgres/<schema>/<table>` for the Postgres table it replicates."""

import dagster as dg

from d1sync_dagster.schema import Table


def asset_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["d1", table.target])


def source_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["postgres", table.spec.source_schema, table.name])
