"""Drain a backlog of queued changes into D1 and report throughput, D1 cost and Supabase-side cost.

    .venv/bin/python benchmarks/apply_drain.py [--changes 100000] [--keys 20000] [--batch-size 5000]

Workload (table `events`: bigint key + text, integer, real, boolean, JSON; no secondary index): insert
`keys` rows, then UPDATE statements touching random keys, then DELETE and re-INSERT a slice, until
`changes` messages are queued by the real capture triggers. Each backend (the local SQLite file, and the
HTTP API stand-in on miniflare's D1 engine) drains the same backlog in its own process, so peak memory
is the drain's alone: that process's own peak resident size (VmHWM) and the planner process's
(`planner_peak_rss_mb`), and their sum.

In the same run, exact copies of the backlog (CREATE DATABASE ... TEMPLATE) are drained by two loops that do
nothing but empty the queue, in batches of the same size: `raw` (SELECT by msg_id order + DELETE, the queue
table's limit) and `pgmq` (pgmq.read + pgmq.delete). d1sync's rate is also given as a ratio of theirs: of the
whole run (`ratio_to_raw`), and of the drain alone (`drain_ratio_to_raw`: the run less the VACUUM of the queue
table that apply runs once the queue is empty and D1 complete, which the raw loops do not).
Supabase-side cost per change, for capture and for each drain: row versions written in the queue table
(inserts + updates + deletes, from pg_stat_user_tables) and WAL bytes (pg_current_wal_lsn before and after;
nothing else should use this Postgres meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import copy_of, fresh_database, print_figures, run_child  # noqa: E402
from d1sync_dagster.engine.planner import resident_peak_mb  # noqa: E402

SCHEMA = {
    "events": {
        "primaryKey": "id",
        "columns": {
            "id": "INTEGER",
            "kind": "TEXT",
            "amount": "INTEGER",
            "score": "REAL",
            "active": "BOOLEAN",
            "payload": "JSON",
        },
    }
}

TABLE = """CREATE TABLE events (id bigint PRIMARY KEY, kind text, amount bigint, score double precision,
                                active boolean, payload jsonb)"""
INSERT = """INSERT INTO events SELECT g, 'kind-' || (g %% 17), g * 1000, g / 3.0, g %% 2 = 0,
            jsonb_build_object('g', g, 'tags', jsonb_build_array('a', 'b'))
            FROM generate_series(%s::bigint, %s::bigint) g"""


def queue_workload(url: str, changes: int, keys: int) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(INSERT, [1, keys])
        queued = keys
        seed = 0
        while queued < changes:
            n = min(changes - queued, 10_000)
            if seed % 5 == 4 and n >= 2:
                half = n // 2
                lo = (seed * 7919) % (keys - half) + 1
                conn.execute("DELETE FROM events WHERE id BETWEEN %s AND %s", [lo, lo + half - 1])
                conn.execute(INSERT, [lo, lo + half - 1])
                queued += 2 * half
            else:
                conn.execute(
                    "UPDATE events SET amount = amount + 1, score = score * 1.5, kind = kind || '!' "
                    "WHERE id IN (SELECT (random() * %s)::bigint + 1 FROM generate_series(1, %s) GROUP BY 1 LIMIT %s)",
                    [keys - 1, n * 2, n],
                )
                queued = conn.execute("SELECT count(*) FROM pgmq.q_replicate_data").fetchone()[0]
            seed += 1
        total = conn.execute("SELECT count(*) FROM pgmq.q_replicate_data").fetchone()[0]
    return {"queued": total}


QUEUE_TABLE = "pgmq.q_replicate_data"


class Cost:
    """WAL bytes and queue-table row versions between `start()` and `stop()`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _read(self) -> tuple[int, int]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            lsn = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()[0]
            (versions,) = conn.execute(
                "SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                "WHERE schemaname = 'pgmq' AND relname = 'q_replicate_data'"
            ).fetchone()
        return int(lsn), int(versions)

    def start(self) -> Cost:
        """Begin after a checkpoint, so every drain pays its full-page writes alike."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            try:
                conn.execute("CHECKPOINT")
            except psycopg.Error:
                pass  # a role without pg_checkpoint: the figures then carry some full-page-write noise
        self.wal, self.versions = self._read()
        return self

    def stop(self, changes: int) -> dict[str, float]:
        wal, versions = self._read()
        return {
            "wal_bytes_per_change": round((wal - self.wal) / max(changes, 1), 1),
            "row_versions_per_change": round((versions - self.versions) / max(changes, 1), 3),
        }


def raw_drain(url: str, batch_size: int, *, via_pgmq: bool) -> dict[str, float]:
    """Empty the queue and nothing else: SELECT + DELETE by msg_id, or pgmq.read + pgmq.delete."""
    import time

    import psycopg

    cost = Cost(url).start()
    changes = 0
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        while True:
            if via_pgmq:
                rows = conn.execute(
                    "SELECT msg_id, message FROM pgmq.read('replicate_data', 120, %s)", [batch_size]
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT msg_id, message FROM {QUEUE_TABLE} ORDER BY msg_id LIMIT %s", [batch_size]
                ).fetchall()
            if not rows:
                break
            ids = [r[0] for r in rows]
            if via_pgmq:
                conn.execute("SELECT pgmq.delete('replicate_data', %s::bigint[])", [ids])
            else:
                conn.execute(f"DELETE FROM {QUEUE_TABLE} WHERE msg_id = ANY(%s)", [ids])
            changes += len(rows)
        seconds = time.monotonic() - started
    return {"changes": changes, "seconds": round(seconds, 2), "changes_per_second": round(changes / seconds)} | (
        cost.stop(changes)
    )


def drain(args: argparse.Namespace) -> None:
    """Child process: setup D1, drain the queue, print figures as JSON."""
    from d1sync_dagster.clients.pgmq import PgmqClient
    from d1sync_dagster.config import d1_settings
    from d1sync_dagster.engine.apply import ApplyOptions, apply
    from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
    from d1sync_dagster.engine.setup import setup_d1
    from d1sync_dagster.schema import parse_schema

    schema = parse_schema(SCHEMA)
    d1 = d1_settings().client()
    setup_d1(d1, schema)
    with PgmqClient(os.environ["DATABASE_URL"]) as pg:
        report = apply(pg, d1, schema, ApplyOptions(batch_size=args.batch_size))
        # This process's own peak (VmHWM). Not getrusage's ru_maxrss: Linux counts in it the resident size
        # of the process that spawned this one, at the spawn. The planner process (engine/planner.py) has
        # ended with the apply; its own peak counts too.
        peak = resident_peak_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        planner_peak = report.planner_peak_mb or 0.0
        drift = diff(pg_rows(pg, schema.tables[0]), d1_rows(d1, schema.tables[0]))
    net = report.tables["events"].upserts + report.tables["events"].deletes
    print(
        json.dumps(
            {
                "changes": report.messages,
                "seconds": round(report.duration_seconds, 2),
                "changes_per_second": round(report.changes_per_second),
                # The drain alone: the run less the queue table's VACUUM after it (which the raw loops do not
                # do; autovacuum would, later).
                "vacuum_seconds": round(report.vacuum_seconds, 3),
                "drain_changes_per_second": round(
                    report.messages / max(report.duration_seconds - report.vacuum_seconds, 1e-9)
                ),
                "requests": report.requests,
                "statements": report.statements,
                "rows_per_request": round(report.rows_per_request),
                "statements_per_request": round(report.statements / max(report.requests, 1), 1),
                "rows_written": report.rows_written,
                "rows_written_per_change": round(report.rows_written / max(report.messages, 1), 3),
                "net_row_changes": net,
                "rows_written_per_net_change": round(report.rows_written / max(net, 1), 3),
                "peak_rss_mb": round(peak),
                "planner_peak_rss_mb": round(planner_peak),
                "peak_rss_both_mb": round(peak + planner_peak),
                "drift_after": drift.total,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--backends", default="sqlite,standin")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        drain(args)
        return
    from d1sync_dagster.clients.pgmq import PgmqClient
    from d1sync_dagster.engine.setup import setup_postgres
    from d1sync_dagster.schema import parse_schema

    print(f"drain of {args.changes:,} queued changes over {args.keys:,} keys, batch size {args.batch_size}")
    for backend in args.backends.split(","):
        with fresh_database() as url:
            with PgmqClient(url) as pg:
                pg.execute(TABLE)
                setup_postgres(pg, parse_schema(SCHEMA))
            cost = Cost(url).start()
            q = queue_workload(url, args.changes, args.keys)
            capture = cost.stop(q["queued"])
            with copy_of(url) as raw_url, copy_of(url) as pgmq_url:
                raw = raw_drain(raw_url, args.batch_size, via_pgmq=False)
                via_pgmq = raw_drain(pgmq_url, args.batch_size, via_pgmq=True)
                cost = Cost(url).start()
                fig = run_child(__file__, backend, url, ["--batch-size", str(args.batch_size)])
                fig |= cost.stop(int(fig["changes"]))  # type: ignore[arg-type]
            fig["ratio_to_raw"] = round(fig["changes_per_second"] / raw["changes_per_second"], 2)  # type: ignore[operator]
            fig["drain_ratio_to_raw"] = round(fig["drain_changes_per_second"] / raw["changes_per_second"], 2)  # type: ignore[operator]
            fig["ratio_to_pgmq_read"] = round(fig["changes_per_second"] / via_pgmq["changes_per_second"], 2)  # type: ignore[operator]
            print_figures(f"{backend} ({q['queued']:,} messages queued)", fig)
            print_figures("  capture (writer's statements, per queued change)", capture)
            print_figures("  raw SELECT + DELETE drain of the same backlog", raw)
            print_figures("  pgmq.read + pgmq.delete drain of the same backlog", via_pgmq)
            per_change = capture["row_versions_per_change"] + float(fig["row_versions_per_change"])  # type: ignore[arg-type]
            print(f"  queue-table row versions per change, capture + apply: {per_change:.3f}")


if __name__ == "__main__":
    main()
