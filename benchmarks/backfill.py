"""Backfill and verify a large table: rows/s into each D1 backend, peak memory, verify time.

    .venv/bin/python benchmarks/backfill.py [--rows 1000000] [--chunk-size 5000] [--backends sqlite,standin]

Table `items`: bigint key, text, bigint, double, boolean, jsonb (6 columns), filled before capture exists,
so only the backfill brings it to D1. Each backend runs in its own process (peak RSS is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fresh_database, print_figures, run_child  # noqa: E402

SCHEMA = {
    "items": {
        "primaryKey": "id",
        "columns": {
            "id": "INTEGER",
            "name": "TEXT",
            "amount": "INTEGER",
            "score": "REAL",
            "active": "BOOLEAN",
            "attrs": "JSON",
        },
    }
}
TABLE = """CREATE TABLE items (id bigint PRIMARY KEY, name text, amount bigint, score double precision,
                               active boolean, attrs jsonb)"""
FILL = """INSERT INTO items SELECT g, 'item ' || g, g * 37, g / 7.0, g %% 3 = 0,
          jsonb_build_object('color', CASE WHEN g %% 2 = 0 THEN 'red' ELSE 'blue' END, 'n', g)
          FROM generate_series(1::bigint, %s::bigint) g"""


def child(args: argparse.Namespace) -> None:
    from d1sync_dagster.clients.pgmq import PgmqClient
    from d1sync_dagster.config import d1_settings
    from d1sync_dagster.engine.backfill import backfill
    from d1sync_dagster.engine.reconcile import reconcile
    from d1sync_dagster.engine.setup import setup_d1
    from d1sync_dagster.schema import parse_schema

    schema = parse_schema(SCHEMA)
    d1 = d1_settings().client()
    setup_d1(d1, schema)
    with PgmqClient(os.environ["DATABASE_URL"]) as pg:
        report = backfill(pg, d1, schema, chunk_size=args.chunk_size)
        peak_backfill = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        verify = reconcile(pg, d1, schema, chunk_size=args.chunk_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = report.tables["items"]
    print(
        json.dumps(
            {
                "rows": report.rows,
                "backfill_seconds": round(report.seconds, 2),
                "backfill_rows_per_second": round(report.rows / report.seconds),
                "chunks": t.chunks,
                "d1_requests": report.apply.requests if report.apply else 0,
                "rows_per_request": round(report.apply.rows_per_request) if report.apply else 0,
                "peak_rss_mb_backfill": round(peak_backfill),
                "verify_seconds": round(verify.seconds, 2),
                "verify_rows_per_second": round(report.rows / verify.seconds),
                "verify_d1_rows_read": verify.d1_rows_read,
                "in_sync": verify.in_sync,
                "peak_rss_mb": round(peak),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=5000)
    ap.add_argument("--backends", default="sqlite,standin")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from d1sync_dagster.clients.pgmq import PgmqClient
    from d1sync_dagster.engine.setup import setup_postgres
    from d1sync_dagster.schema import parse_schema

    print(f"backfill + verify of {args.rows:,} rows (6 columns incl. JSON), chunk size {args.chunk_size}")
    for backend in args.backends.split(","):
        with fresh_database() as url:
            with PgmqClient(url) as pg:
                pg.execute(TABLE)
                pg.execute(FILL, [args.rows])
                pg.execute("VACUUM ANALYZE items")
                setup_postgres(pg, parse_schema(SCHEMA))
            print_figures(backend, run_child(__file__, backend, url, ["--chunk-size", str(args.chunk_size)]))


if __name__ == "__main__":
    main()
