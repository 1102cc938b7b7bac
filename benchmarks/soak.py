"""Soak: sustained writes with the sensor deciding when to apply; replication lag, D1 requests, queue size.

    .venv/bin/python benchmarks/soak.py [--rate 1000] [--seconds 60] [--interval 1] [--backend sqlite|standin]
    .venv/bin/python benchmarks/soak.py --daemon [--mode stream|run] [--rate 1000] [--seconds 60] [--json]

A writer commits `rate` changes per second (multi-row statements every 100 ms: inserts and updates of the
example `apps` table).

In-process (default): every `interval` seconds the real `pgmq_depth_sensor` is evaluated; when it asks for
a run, the apply engine (the one the `d1/*` assets run) drains the queue in this process. Lag is measured
per message from its enqueue time to the D1 commit of its batch.

`--daemon --instance postgres --faults kill9,sigterm,group,lockd1,readonly,pgterm`: the fault soak, on a
Postgres-backed instance with run monitoring; each fault's recovery (how long until changes flowed again) is
reported.

`--daemon`: nothing in process. A fresh DAGSTER_HOME, `dagster-daemon run -w workspace.yaml` with the
sensor every `interval` seconds, in `--mode stream` (the sensor keeps a `d1sync_stream` run alive) or `run`
(a `d1sync_apply` run per tick with changes waiting), and the local D1 file. Lag is measured per inserted
row from its commit to the moment it is seen in the D1 file (polled every 10 ms). `--json` ends with one
line `{"lag_p50_s", "lag_p99_s", "lag_max_s", "runs", "drift"}`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg  # noqa: E402

from benchmarks.common import d1_standin, fresh_database, writer  # noqa: E402
from d1sync_dagster.clients.pgmq import PgmqClient  # noqa: E402
from d1sync_dagster.config import d1_settings  # noqa: E402
from d1sync_dagster.defs.resources import PostgresResource  # noqa: E402
from d1sync_dagster.defs.sensors import build_depth_sensor  # noqa: E402
from d1sync_dagster.engine.apply import ApplyOptions, apply  # noqa: E402
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows  # noqa: E402
from d1sync_dagster.engine.setup import setup  # noqa: E402
from d1sync_dagster.schema import load_schema  # noqa: E402
from d1sync_dagster.sql.capture import example_source_tables  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--backend", choices=["sqlite", "standin"], default="sqlite")
    ap.add_argument("--daemon", action="store_true", help="through dagster-daemon on workspace.yaml")
    ap.add_argument("--mode", choices=["stream", "run"], default="stream", help="with --daemon: D1SYNC_APPLY_MODE")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--stream-seconds", type=float, default=None, help="with --daemon: D1SYNC_STREAM_SECONDS")
    ap.add_argument(
        "--timeline", action="store_true", help="with --daemon: print when each run was created, began, ended"
    )
    ap.add_argument(
        "--instance", choices=["sqlite", "postgres"], default="sqlite", help="with --daemon: the instance's storage"
    )
    ap.add_argument(
        "--faults",
        default="",
        help="with --daemon: faults injected in turn while writing, comma-separated: kill9, sigterm (the run "
        "following the queue), group (kill -9 of the daemon's process group, then the daemon again), lockd1 "
        "(the D1 file locked for 10 s), readonly (the D1 file immutable for 10 s, root and ext4: chattr), pgterm "
        "(every d1sync connection terminated)",
    )
    ap.add_argument("--fault-every", type=float, default=20.0, help="with --faults: seconds between faults")
    args = ap.parse_args()
    if args.daemon:
        from benchmarks.soak_daemon import soak_daemon

        soak_daemon(args)
        return
    schema = load_schema(ROOT / "schema.json")
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        with PgmqClient(url) as pg:
            pg.execute(example_source_tables())
        if args.backend == "standin":
            cm = d1_standin()
            env = cm.__enter__()
        else:
            cm, env = None, {"D1_LOCAL_PATH": str(Path(tmp) / "d1.sqlite")}
        d1 = d1_settings(env).client()
        lags: list[float] = []
        sizes: list[int] = []
        requests = runs = 0
        with PgmqClient(url) as pg:
            setup(pg, d1, schema)
            stop, written = threading.Event(), [0]
            w = threading.Thread(target=writer, args=(url, args.rate, args.seconds, stop, written))
            w.start()
            sensor = build_depth_sensor(dg.define_asset_job("d1sync_apply"), interval_seconds=int(args.interval))
            resource = PostgresResource(database_url=url)

            def record(ids: list[int]) -> None:
                committed = time.time()
                rows = pg.execute(
                    "SELECT extract(epoch FROM enqueued_at) FROM pgmq.q_replicate_data WHERE msg_id = ANY(%s)", [ids]
                )
                lags.extend(committed - float(e) for (e,) in rows)

            with dg.instance_for_test() as instance:
                cursor = None
                while w.is_alive() or pg.metrics().queue_length:
                    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"postgres": resource})
                    tick = sensor.evaluate_tick(ctx)
                    cursor = tick.cursor
                    sizes.append(int(pg.execute("SELECT pg_total_relation_size('pgmq.q_replicate_data')")[0][0]))
                    if tick.run_requests:
                        report = apply(pg, d1, schema, ApplyOptions(), after_d1_commit=record)
                        requests += report.requests
                        runs += 1
                    time.sleep(args.interval)
            w.join()
            drift = sum(diff(pg_rows(pg, t), d1_rows(d1, t)).total for t in schema.tables)
        d1.close()
        if cm is not None:
            cm.__exit__(None, None, None)
    lags.sort()
    q = statistics.quantiles(lags, n=100) if len(lags) > 1 else [0.0] * 99
    setting = f"at {args.rate}/s for {args.seconds:.0f}s, sensor every {args.interval}s, D1 {args.backend}"
    print(f"soak: {written[0]:,} changes {setting}")
    print(f"  apply runs                   {runs}")
    print(f"  D1 requests                  {requests} ({requests / max(args.seconds, 1) * 300:.0f} per 5 minutes)")
    print(f"  lag p50 / p99 / max          {q[49]:.2f} s / {q[98]:.2f} s / {lags[-1] if lags else 0:.2f} s")
    mb = [x / 1e6 for x in sizes]
    print(f"  queue table size             min {min(mb):.2f} MB, max {max(mb):.2f} MB, end {mb[-1]:.2f} MB")
    print(f"  drift after the run          {drift}")


if __name__ == "__main__":
    main()
