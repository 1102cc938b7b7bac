"""One source transaction of many row changes, published to D1 whole: in one request (up to
`transaction_bytes`) or staged and published by one request (`core/staging.py`). Prints how long the
apply took, how long the final publish request took (D1's bound is 30 s per query), and the peak memory.

    .venv/bin/python benchmarks/big_transaction.py [--rows 1000000] [--staged]

On the local SQLite backend (the D1 engine's SQLite, not Cloudflare's servers).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fresh_database  # noqa: E402
from d1sync_dagster.clients.d1_local import LocalD1Client  # noqa: E402
from d1sync_dagster.clients.pgmq import PgmqClient  # noqa: E402
from d1sync_dagster.engine.apply import ApplyOptions, apply  # noqa: E402
from d1sync_dagster.engine.setup import setup  # noqa: E402
from d1sync_dagster.schema import parse_schema  # noqa: E402

SCHEMA = parse_schema({"ledger": {"primaryKey": "id", "columns": {"id": "INTEGER", "amount": "INTEGER"}}})


class Timed(LocalD1Client):
    """The local D1 file, timing the request that makes the rows visible (the publish of a staged
    transaction, or the one request of one that fits)."""

    seconds: list[float] = []

    def batch(self, statements):
        started = time.perf_counter()
        try:
            return super().batch(statements)
        finally:
            publishes = any(
                s.sql.startswith('INSERT INTO "ledger"') or s.sql.startswith('DELETE FROM "ledger"') for s in statements
            )
            if publishes:
                self.seconds.append(time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--staged", action="store_true", help="force staging (transaction_bytes of 1 MB)")
    args = ap.parse_args()
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, amount bigint NOT NULL)")
        d1 = Timed(Path(tmp) / "d1.sqlite")
        with PgmqClient(url) as pg:
            setup(pg, d1, SCHEMA)
            started = time.perf_counter()
            pg.execute("INSERT INTO ledger SELECT g, g * 7 FROM generate_series(1, %s) g", [args.rows])
            captured = time.perf_counter() - started
            Timed.seconds = []
            options = ApplyOptions(transaction_bytes=1_000_000) if args.staged else ApplyOptions()
            started = time.perf_counter()
            report = apply(pg, d1, SCHEMA, options)
            seconds = time.perf_counter() - started
        (res,) = d1.query("SELECT count(*) AS n FROM ledger")
        d1.close()
    print(f"one transaction of {args.rows:,} row changes, {'staged' if args.staged else 'one request if it fits'}")
    print(f"  capture (the INSERT)       {captured:.2f} s")
    staged = report.staged_transactions
    print(f"  apply                      {seconds:.2f} s, {report.requests} D1 requests, staged {staged}")
    print(f"  the publish request        {max(Timed.seconds):.2f} s  (D1's bound is 30 s per query)")
    print(f"  rows in D1                 {res.results[0]['n']:,}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak memory                {peak:.0f} MB, planner process {report.planner_peak_mb or 0:.0f} MB")


if __name__ == "__main__":
    main()
