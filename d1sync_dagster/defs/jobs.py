"""Jobs that are not asset materializations."""

import dagster as dg

from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import D1SyncError
from d1sync_dagster.schema import Schema


def build_setup_job(schema: Schema) -> dg.JobDefinition:
    """`d1sync_setup`: queue and triggers in Postgres, tables and indexes in D1 (idempotent)."""

    @dg.op(name="d1sync_setup_op", description="Create the PGMQ queue, capture triggers, D1 tables and indexes.")
    def setup_op(context: dg.OpExecutionContext, postgres: PostgresResource, d1: D1Resource) -> dg.Output[None]:
        client = d1.get_client()
        try:
            with postgres.get_client() as pg:
                result = setup(pg, client, schema)
        except D1SyncError as e:
            raise dg.Failure(description=str(e)) from e
        finally:
            client.close()
        context.log.info(f"setup done: schema version {result.schema_version}, tables {', '.join(result.tables)}")
        return dg.Output(
            None,
            metadata={
                "schema_version": dg.MetadataValue.text(result.schema_version),
                "tables": dg.MetadataValue.int(len(result.tables)),
                "d1_statements": dg.MetadataValue.int(result.d1_statements),
            },
        )

    @dg.job(name="d1sync_setup", description="Create or update the capture side in Postgres and the tables in D1.")
    def setup_job() -> None:
        setup_op()

    return setup_job
