"""Drain one backlog into one D1 database and into 16 hashed shards, in one run, and compare.

    .venv/bin/python benchmarks/shards_drain.py [--changes 100000] [--shards 16] [--tenants 1000] [--rtt 0.03]

A `devices` table (tenant column, 1,000 tenants) gets `changes` row changes through the capture triggers:
inserts, then updates of half the rows, a tenth of them moving the row to another tenant (so, for the
shards, to another database). The same queue (an exact copy of the database for each drain) is drained by
`apply` into local D1 files:

- one database holding the whole table;
- `--shards` databases, the table hashed by tenant (`core/shards.py`), written concurrently
  (`D1SYNC_SHARD_PARALLEL`, default 8);

each once as the files answer, and once through a model of D1 over the HTTP API, which local files do not
have: every request waits `--rtt` seconds (the round trip) plus `--row-cost` seconds per row D1 reports
written (a database's one writer: the requests of one database queue behind each other, those of different
databases do not). The model's figures are marked "model". Every drain is checked exact: each database
holds exactly the rows its rule routes there. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import copy_of, fresh_database  # noqa: E402
from d1sync_dagster.clients.d1 import D1Client, QueryResult  # noqa: E402
from d1sync_dagster.clients.d1_local import LocalD1Client  # noqa: E402
from d1sync_dagster.clients.d1_shards import ShardedD1  # noqa: E402
from d1sync_dagster.clients.pgmq import PgmqClient  # noqa: E402
from d1sync_dagster.core.shards import rule_from_json  # noqa: E402
from d1sync_dagster.core.statements import Statement  # noqa: E402
from d1sync_dagster.engine.apply import ApplyOptions, apply  # noqa: E402
from d1sync_dagster.engine.health import d1_row_counts  # noqa: E402
from d1sync_dagster.engine.setup import setup, setup_d1  # noqa: E402
from d1sync_dagster.schema import parse_schema  # noqa: E402

SCHEMA = parse_schema(
    {
        "devices": {
            "primaryKey": "id",
            "columns": {"id": "INTEGER", "tenant": "TEXT", "name": "TEXT", "seen": "INTEGER"},
            "indexes": [["tenant"]],
        }
    }
)


class _Modelled:
    """A local D1 file answering as the model above says D1 would: after `rtt` plus `row_cost` per row
    written. One lock per database: its requests run one after another, as on D1's single writer."""

    def __init__(self, inner: D1Client, rtt: float, row_cost: float) -> None:
        self.inner, self.rtt, self.row_cost = inner, rtt, row_cost
        self._writer = threading.Lock()

    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        with self._writer:
            results = self.inner.batch(statements)
            time.sleep(self.rtt + self.row_cost * sum(r.rows_written for r in results))
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _write(url: str, changes: int, tenants: int) -> int:
    rows = changes * 2 // 3
    with PgmqClient(url) as pg:
        pg.execute("CREATE TABLE devices (id bigint PRIMARY KEY, tenant text, name text, seen integer)")
        with tempfile.TemporaryDirectory() as tmp:
            setup(pg, LocalD1Client(Path(tmp) / "x.sqlite"), SCHEMA)
        for lo in range(0, rows, 5000):
            pg.execute(
                "INSERT INTO devices SELECT g, 'tenant-' || (g %% %s), 'device ' || g, 0 "
                "FROM generate_series(%s::bigint, %s::bigint) g",
                [tenants, lo + 1, min(rows, lo + 5000)],
            )
        for lo in range(0, rows, 10_000):  # half the rows updated; a tenth of those move to another tenant
            pg.execute(
                "UPDATE devices SET seen = seen + 1, tenant = CASE WHEN id %% 10 = 0 "
                "THEN 'tenant-' || ((id / 10) %% %s) ELSE tenant END "
                "WHERE id %% 2 = 0 AND id > %s AND id <= %s",
                [tenants, lo, lo + 10_000],
            )
        return pg.metrics().queue_length


def _databases(work: Path, shards: int, model: tuple[float, float] | None) -> D1Client:
    def open_(name: str) -> D1Client:
        client: D1Client = LocalD1Client(work / f"{name}.sqlite")
        return _Modelled(client, *model) if model else client

    if shards <= 1:
        return open_("one")
    names = [f"s{i}" for i in range(shards)]
    rule = rule_from_json("devices", {"column": "tenant", "hash": names})
    return ShardedD1(open_("home"), {n: open_(n) for n in names}, {"devices": rule})


def _drain(url: str, shards: int, model: tuple[float, float] | None, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, copy_of(url) as copy, PgmqClient(copy) as pg:
        d1 = _databases(Path(tmp), shards, model)
        setup_d1(d1, SCHEMA)
        started = time.monotonic()
        report = apply(pg, d1, SCHEMA, ApplyOptions(batch_size=batch, vacuum_dead_rows=None))
        seconds = time.monotonic() - started
        source = int(pg.execute("SELECT count(*) FROM devices")[0][0])
        counts = d1_row_counts(d1, SCHEMA.table("devices"))
        if sum(counts.values()) != source or report.dead_lettered:
            raise SystemExit(f"drain into {shards} databases is not exact: {counts} vs {source} rows")
        if isinstance(d1, ShardedD1):
            _check_routing(d1)
        d1.close()
    return {
        "databases": max(shards, 1),
        "model": None if model is None else {"rtt_s": model[0], "row_cost_s": model[1]},
        "changes": report.messages,
        "seconds": round(seconds, 2),
        "changes_per_s": round(report.messages / seconds),
        "d1_requests": report.requests,
        "rows_per_request": round(report.rows_per_request, 1),
    }


def _check_routing(d1: ShardedD1) -> None:
    """Each shard holds only rows its rule routes there."""
    rule = d1.rules["devices"]
    for name, client in d1.databases_of("devices"):
        (res,) = client.query("SELECT DISTINCT tenant FROM devices")
        wrong = [r["tenant"] for r in res.results if rule.route(r["tenant"]) != name]
        if wrong:
            raise SystemExit(f"shard {name} holds tenants of other shards: {wrong[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--rtt", type=float, default=0.03, help="the model: seconds of round trip per D1 request")
    ap.add_argument("--row-cost", type=float, default=25e-6, help="the model: seconds per row D1 writes")
    ap.add_argument("--batch-size", type=int, default=2000)
    args = ap.parse_args()
    with fresh_database() as url:
        queued = _write(url, args.changes, args.tenants)
        print(f"{queued:,} changes queued ({args.tenants} tenants)")
        runs = []
        for model in (None, (args.rtt, args.row_cost)):
            for shards in (1, args.shards):
                runs.append(_drain(url, shards, model, args.batch_size))
                r = runs[-1]
                print(
                    f"{r['databases']:>3} database(s){' (model)' if model else '':>8}: "
                    f"{r['changes_per_s']:>8,} changes/s, {r['d1_requests']:>5} requests, "
                    f"{r['rows_per_request']:>7} rows/request, {r['seconds']} s"
                )
    local, sharded, local_model, sharded_model = runs
    out = {
        "runs": runs,
        "ratio_sharded_to_one": round(sharded["changes_per_s"] / local["changes_per_s"], 2),
        "ratio_sharded_to_one_model": round(sharded_model["changes_per_s"] / local_model["changes_per_s"], 2),
    }
    print(
        f"{args.shards} shards / one database: {out['ratio_sharded_to_one']}x on local files, "
        f"{out['ratio_sharded_to_one_model']}x in the model"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
