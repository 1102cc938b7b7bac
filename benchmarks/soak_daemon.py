"""`benchmarks/soak.py --daemon`: the soak through the real `dagster-daemon` (see soak.py's docstring)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from benchmarks.common import fresh_database
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.capture import example_source_tables

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _writer(url: str, rate: int, seconds: float, committed: dict[int, float], stop: threading.Event) -> None:
    """Inserts (ids 1, 2, ... in commit order) and updates, `rate` changes/s in 10 statements a second;
    `committed[id]` is when the insert's transaction committed."""
    per_tick = max(2, rate // 10)
    next_id = 1
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.monotonic()
        tick = 0
        while not stop.is_set() and time.monotonic() - start < seconds:
            inserts = per_tick // 2
            conn.execute(
                "INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 3.0 "
                "FROM generate_series(%s::bigint, %s::bigint) g",
                [next_id, next_id + inserts - 1],
            )
            now = time.monotonic()
            for i in range(next_id, next_id + inserts):
                committed[i] = now
            next_id += inserts
            conn.execute(
                "UPDATE apps SET name = name || '.', rating = rating + 1 WHERE id IN "
                "(SELECT (random() * %s)::bigint + 1 FROM generate_series(1, %s))",
                [max(1, next_id - 2), per_tick - inserts],
            )
            tick += 1
            time.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))


def _watcher(path: str, seen: dict[int, float], stop: threading.Event) -> None:
    """Polls the D1 file every 10 ms: rows arrive in commit order, so the highest id seen means every lower
    inserted id is there too."""
    highest = 0
    while not stop.is_set():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
                while not stop.is_set():
                    (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM apps").fetchone()
                    now = time.monotonic()
                    for i in range(highest + 1, int(top) + 1):
                        seen[i] = now
                    highest = max(highest, int(top))
                    time.sleep(0.01)
        except sqlite3.Error:
            time.sleep(0.05)  # the file is being created or the table altered


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The daemon and everything it started (code server, run workers)."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _runs(home: str) -> dict[str, int]:
    """Runs per job and status in the instance."""
    import dagster as dg

    with dg.DagsterInstance.from_config(home) as instance:
        out: dict[str, int] = {}
        for r in instance.get_runs():
            key = f"{r.job_name} {r.status.value.lower()}"
            out[key] = out.get(key, 0) + 1
        return out


def soak_daemon(args: Any) -> None:
    schema = load_schema(ROOT / "schema.json")
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        d1_path = str(Path(tmp) / "d1.sqlite")
        home = Path(tmp) / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        with PgmqClient(url) as pg:
            pg.execute(example_source_tables())
            d1 = LocalD1Client(d1_path)
            setup(pg, d1, schema)
        env = os.environ | {
            "DAGSTER_HOME": str(home),
            "DATABASE_URL": url,
            "D1_LOCAL_PATH": d1_path,
            "D1SYNC_SCHEMA": str(ROOT / "schema.json"),
            "D1SYNC_APPLY_MODE": args.mode,
            "D1SYNC_SENSOR_INTERVAL_SECONDS": str(int(args.interval)),
            # By default one streaming run covers the whole soak; --stream-seconds shorter shows the restarts.
            "D1SYNC_STREAM_SECONDS": str(args.stream_seconds or max(60.0, args.seconds + 60)),
        }
        for k in [k for k in env if k.startswith("CLOUDFLARE_")]:
            env.pop(k)
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - open while the daemon runs
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=env, cwd=ROOT, stdout=log, check=True)
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        committed: dict[int, float] = {}
        seen: dict[int, float] = {}
        stop = threading.Event()
        try:
            with PgmqClient(url) as pg:
                ready = time.monotonic() + 180
                # The sensor's first tick (and, streaming, the run's start) before the clock runs: start-up
                # is not replication lag.
                while time.monotonic() < ready and (args.mode == "stream" and not pg.lock_holders()):
                    time.sleep(0.2)
                if args.mode == "run":
                    time.sleep(args.interval + 5)
                watcher = threading.Thread(target=_watcher, args=(d1_path, seen, stop), daemon=True)
                watcher.start()
                started = time.monotonic()
                _writer(url, args.rate, args.seconds, committed, threading.Event())
                written = len(committed)
                drain_by = time.monotonic() + 120
                while time.monotonic() < drain_by and (pg.metrics().queue_length or len(seen) < written):
                    time.sleep(0.2)
                stop.set()
                watcher.join()
                elapsed = time.monotonic() - started
                drift = sum(diff(pg_rows(pg, t), d1_rows(d1, t)).total for t in schema.tables)
        finally:
            stop.set()
            _stop(daemon)
            log.close()
        runs = _runs(str(home))
        d1.close()
    lags = sorted(seen[i] - committed[i] for i in committed if i in seen)
    missing = len(committed) - len(lags)
    q = statistics.quantiles(lags, n=100) if len(lags) > 1 else [0.0] * 99
    figures = {
        "lag_p50_s": round(q[49], 3),
        "lag_p99_s": round(q[98], 3),
        "lag_max_s": round(lags[-1], 3) if lags else None,
        "runs": sum(runs.values()),
        "drift": drift + missing,
    }
    setting = f"{args.rate}/s for {args.seconds:.0f}s, sensor every {args.interval:g}s"
    print(f"soak through dagster-daemon, mode {args.mode}: {setting}")
    print(f"  inserted rows timed          {len(lags):,} of {len(committed):,} ({elapsed:.0f}s with the drain)")
    print(
        f"  lag p50 / p99 / max          {figures['lag_p50_s']} s / {figures['lag_p99_s']} s / {figures['lag_max_s']} s"
    )
    print(f"  runs                         {', '.join(f'{n} {k}' for k, n in sorted(runs.items()))}")
    print(f"  drift after the run          {drift} (rows never seen in D1: {missing})")
    if args.json:
        print(json.dumps(figures))
