"""The `d1sync` command: parses arguments, builds clients from the environment, calls engine functions.

Exit codes: 0 success, 1 the operation ran and found a problem, 2 bad configuration or input, 3 a service
(Postgres or D1) failed or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from d1sync_dagster import config
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import ConfigError, D1Error, D1SyncError, QueueError, SchemaError
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.capture import example_source_tables, migration
from d1sync_dagster.sql.d1_ddl import schema_ddl


def _cmd_generate_sql(args: argparse.Namespace) -> int:
    schema = load_schema(args.schema)
    if args.target == "d1":
        sys.stdout.write(";\n".join(schema_ddl(schema)) + ";\n")
    else:
        sys.stdout.write(migration(schema, queue=args.queue))
    return 0


def _cmd_setup(args: argparse.Namespace) -> int:
    schema = load_schema(args.schema)
    d1_settings = config.d1_settings()
    url = config.database_url()
    with PgmqClient(url, queue=args.queue) as pg:
        if args.create_example_tables:
            pg.execute(example_source_tables())
        d1 = d1_settings.client()
        try:
            result = setup(pg, d1, schema)
        finally:
            d1.close()
    out = {
        "schema_version": result.schema_version,
        "tables": result.tables,
        "queue": args.queue,
        "d1_backend": d1_settings.backend,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"setup done: {len(result.tables)} tables ({', '.join(result.tables)}), queue {args.queue}, "
            f"schema version {result.schema_version}, D1 backend {d1_settings.backend}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d1sync", description="Keep Cloudflare D1 in step with Postgres via PGMQ.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--schema", default=config.schema_path(), help="path of schema.json (env D1SYNC_SCHEMA)")
        p.add_argument("--queue", default=config.queue_name(), help="PGMQ queue name (env D1SYNC_QUEUE)")

    p = sub.add_parser("generate-sql", help="print the Postgres capture migration (or the D1 DDL)")
    common(p)
    p.add_argument("--target", choices=["postgres", "d1"], default="postgres")
    p.set_defaults(func=_cmd_generate_sql)

    p = sub.add_parser("setup", help="create queue and triggers in Postgres, tables and indexes in D1 (idempotent)")
    common(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--create-example-tables",
        action="store_true",
        help="first create the Postgres tables of the example schema.json if missing (demo and first run)",
    )
    p.set_defaults(func=_cmd_setup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (SchemaError, ConfigError) as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 2
    except (QueueError, D1Error) as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 3
    except D1SyncError as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
