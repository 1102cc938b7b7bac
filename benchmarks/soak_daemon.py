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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import psutil
import psycopg

from benchmarks.common import WRITER_NAME, fresh_database, writer
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.txns import applied
from d1sync_dagster.dev import DAGSTER_YAML, postgres_storage_yaml
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.capture import example_source_tables

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


def _position_watcher(
    path: str, xids: list[tuple[int, float]], covered: dict[int, float], stop: threading.Event
) -> None:
    """Polls D1's read-your-writes position every 10 ms; `covered[xid]` is when it first covered `xid` (the
    answer `d1sync applied` and `readers/position.ts` give)."""
    done = 0
    while not stop.is_set():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
                while not stop.is_set():
                    row = conn.execute("SELECT value FROM _d1sync_meta WHERE key = 'position'").fetchone()
                    now = time.monotonic()
                    while row and done < len(xids) and applied(row[0], xids[done][0]):
                        covered[xids[done][0]] = now
                        done += 1
                    time.sleep(0.01)
        except sqlite3.Error:
            time.sleep(0.05)


def _skips(log: Path) -> list[str]:
    """The sensor's skip reasons the daemon logged, with their times (for --timeline)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "skipped" in line.lower() and "sensor" in line.lower():
            out.append(line.strip()[:220])
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The daemon and everything it started (code server, run workers)."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _signal(family, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    _signal(family, signal.SIGKILL)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


#: (run id, created, started, ended, tags) of a run, for --timeline.
Timed = tuple[str, float, float | None, float | None, dict[str, str]]


def _runs(home: str) -> tuple[dict[str, int], dict[str, float], list[Timed]]:
    """Runs per job and status in the instance, and the median phases of the finished runs (seconds): from
    the run's creation to its start (the daemon launching it, the run worker starting and loading the code),
    its steps, and the rest of the run."""
    import dagster as dg

    with dg.DagsterInstance.from_config(home) as instance:
        counts: dict[str, int] = {}
        launch, steps, rest = [], [], []
        timeline: list[Timed] = []
        for record in sorted(instance.get_run_records(), key=lambda rec: rec.create_timestamp):
            r = record.dagster_run
            timeline.append(
                (r.run_id[:8], record.create_timestamp.timestamp(), record.start_time, record.end_time, r.tags)
            )
            key = f"{r.job_name} {r.status.value.lower()}"
            counts[key] = counts.get(key, 0) + 1
            if record.start_time is None or record.end_time is None:
                continue
            launch.append(record.start_time - record.create_timestamp.timestamp())
            stats = instance.get_run_step_stats(r.run_id)
            busy = sum((s.end_time or 0) - (s.start_time or 0) for s in stats if s.start_time and s.end_time)
            steps.append(busy)
            rest.append(record.end_time - record.start_time - busy)

        def median(xs: list[float]) -> float:
            return round(statistics.median(xs), 2) if xs else 0.0

        phases = {"to_start_s": median(launch), "steps_s": median(steps), "rest_s": median(rest)}
        return counts, phases, timeline


def _holder_pid(url: str) -> int | None:
    """The process that holds the consumer lock (the application name says its pid)."""
    with PgmqClient(url) as pg:
        for _pid, app, _since in pg.lock_holders():
            if "(pid " in app:
                return int(app.split("(pid ", 1)[1].split(")", 1)[0])
    return None


class Faults:
    """Injects `kinds` in turn every `every` seconds while the writer writes; `events` gets (kind, when the
    outage's clock starts: the fault, or the end of a 10 s D1 lock or read-only spell, time.monotonic)."""

    def __init__(self, kinds: list[str], every: float, url: str, d1_path: str, restart: Any) -> None:
        self.kinds, self.every, self.url, self.d1_path, self.restart = kinds, every, url, d1_path, restart
        self.events: list[tuple[str, float]] = []
        self.notes: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(self.every):
            kind = self.kinds[i % len(self.kinds)]
            i += 1
            try:
                self._inject(kind)
            except Exception as e:  # noqa: BLE001 - said in the report
                self.notes.append(f"{kind}: not injected ({e})")

    def _inject(self, kind: str) -> None:
        if kind in ("kill9", "sigterm"):
            pid = _holder_pid(self.url)
            if pid is None:
                self.notes.append(f"{kind}: nobody held the lock")
                return
            os.kill(pid, signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
            self.events.append((kind, time.monotonic()))
        elif kind == "group":  # the daemon, its code server and run workers at once (an OOM kill, a host crash)
            self.events.append((kind, time.monotonic()))
            self.restart()
        elif kind == "lockd1":
            conn = sqlite3.connect(self.d1_path, isolation_level=None, timeout=30)
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(10)
            conn.execute("ROLLBACK")
            conn.close()
            self.events.append((kind, time.monotonic()))
        elif kind == "readonly":
            # The D1 file and its write-ahead log made immutable for 10 s (chattr +i, which binds root too):
            # every write the run makes fails (SQLite says "disk I/O error", SQLITE_IOERR_WRITE), as on a disk
            # gone read-only. D1's own read-only answer (SQLITE_READONLY) is tested in tests/engine/test_stream.py.
            files = [f for f in (self.d1_path, self.d1_path + "-wal") if os.path.exists(f)]
            subprocess.run(["chattr", "+i", *files], check=True, capture_output=True)
            try:
                time.sleep(10)
            finally:
                subprocess.run(["chattr", "-i", *files], check=True, capture_output=True)
            self.events.append((kind, time.monotonic()))
        elif kind == "pgterm":  # every d1sync connection (a Supabase restart, a pooler recycling)
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND application_name <> %s",
                    [WRITER_NAME],
                )
            self.events.append((kind, time.monotonic()))


def recoveries(
    events: list[tuple[str, float]], committed: dict[int, float], seen: dict[int, float]
) -> list[tuple[str, float]]:
    """Per fault: how long from its clock's start until the rows committed in the second after it were all
    in D1 (an upper bound of the time changes stopped flowing; it includes the ordinary lag)."""
    out = []
    for kind, at in events:
        after = [i for i, t in committed.items() if at <= t < at + 1.0]
        if after:
            out.append((kind, max(seen.get(i, float("inf")) for i in after) - at))
    return out


def soak_daemon(args: Any) -> None:
    schema = load_schema(ROOT / "schema.json")
    faults = [k for k in (getattr(args, "faults", "") or "").split(",") if k]
    with (
        fresh_database() as url,
        tempfile.TemporaryDirectory() as tmp,
        fresh_database() if args.instance == "postgres" else nullcontext("") as storage,
    ):
        d1_path = str(Path(tmp) / "d1.sqlite")
        home = Path(tmp) / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text(DAGSTER_YAML + (postgres_storage_yaml(storage) if storage else ""))
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
            "DAGSTER_PG_PASSWORD": (psycopg.conninfo.conninfo_to_dict(storage).get("password") or "")
            if storage
            else "",
            # By default one streaming run covers the whole soak; --stream-seconds shorter shows the restarts.
            # (long enough that the sensor's handover, 2 intervals + 60 s before its end, comes after the soak)
            "D1SYNC_STREAM_SECONDS": str(args.stream_seconds or args.seconds + 2 * args.interval + 120),
        }
        for k in [k for k in env if k.startswith("CLOUDFLARE_")]:
            env.pop(k)
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - open while the daemon runs
        subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=env, cwd=ROOT, stdout=log, check=True)

        def start_daemon() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        daemon = start_daemon()
        family = [daemon]

        def restart() -> None:
            """kill -9 of the daemon's whole process group, then the daemon again (as a supervisor would)."""
            try:
                pids = [family[0].pid] + [c.pid for c in psutil.Process(family[0].pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = [family[0].pid]
            _signal(pids, signal.SIGKILL)
            family[0].wait()
            family[0] = start_daemon()

        injector = Faults(faults, args.fault_every, url, d1_path, restart)
        committed: dict[int, float] = {}
        seen: dict[int, float] = {}
        xids: list[tuple[int, float]] = []
        covered: dict[int, float] = {}
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
                positions = threading.Thread(target=_position_watcher, args=(d1_path, xids, covered, stop), daemon=True)
                positions.start()
                started = time.monotonic()
                if faults:
                    injector.thread.start()
                writer(url, args.rate, args.seconds, threading.Event(), [0], committed, xids)
                injector.stop.set()
                if faults:
                    injector.thread.join()
                    pg.reconnect()  # a pgterm fault terminated this connection too
                written = len(committed)
                drain_by = time.monotonic() + 120
                while time.monotonic() < drain_by and (pg.metrics().queue_length or len(seen) < written):
                    time.sleep(0.2)
                while time.monotonic() < drain_by and len(covered) < len(xids):
                    time.sleep(0.2)
                stop.set()
                watcher.join()
                positions.join()
                elapsed = time.monotonic() - started
                drift = sum(diff(pg_rows(pg, t), d1_rows(d1, t)).total for t in schema.tables)
                dead_letters = pg.metrics(pg.dlq).queue_length
        finally:
            stop.set()
            injector.stop.set()
            _stop(family[0])
            log.close()
        os.environ.setdefault("DAGSTER_PG_PASSWORD", env["DAGSTER_PG_PASSWORD"])  # (read by the instance here too)
        runs, phases, timeline = _runs(str(home))
        skips = _skips(Path(tmp) / "daemon.log") if getattr(args, "timeline", False) else []
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
        "dead_letters": dead_letters,
    }
    waits = sorted(covered[x] - t for x, t in xids if x in covered)
    if len(waits) > 1:
        pq = statistics.quantiles(waits, n=100)
        figures["position_p50_s"], figures["position_p99_s"] = round(pq[49], 3), round(pq[98], 3)
        figures["position_uncovered"] = len(xids) - len(waits)
    healed = recoveries(injector.events, committed, seen)
    if faults:
        figures["faults"] = len(healed)
        figures["recovery_max_s"] = round(max((t for _, t in healed), default=0.0), 3)
    setting = f"{args.rate}/s for {args.seconds:.0f}s, sensor every {args.interval:g}s, {args.instance} instance"
    print(f"soak through dagster-daemon, mode {args.mode}: {setting}")
    print(f"  inserted rows timed          {len(lags):,} of {len(committed):,} ({elapsed:.0f}s with the drain)")
    print(
        f"  lag p50 / p99 / max          {figures['lag_p50_s']} s / {figures['lag_p99_s']} s / {figures['lag_max_s']} s"
    )
    if "position_p99_s" in figures:
        print(
            f"  position covers a commit     p50 {figures['position_p50_s']} s / p99 {figures['position_p99_s']} s "
            f"({len(waits):,} transactions; {figures['position_uncovered']} never covered)"
        )
    listed = ", ".join(f"{n} {k}" for k, n in sorted(runs.items()))
    print(f"  runs                         {listed} (the last one stopped with the daemon)")
    print(
        f"  a finished run, median        {phases['to_start_s']} s from its creation to its start (launch, run "
        f"worker, code), {phases['steps_s']} s in its steps, {phases['rest_s']} s besides"
    )
    print(f"  drift after the run          {drift} (rows never seen in D1: {missing}), {dead_letters} dead letters")
    for kind, took in healed:
        print(f"  fault {kind:<8}               changes flowed again within {took:.2f} s")
    for note in injector.notes:
        print(f"  fault {note}")
    if getattr(args, "timeline", False):
        zero = min(t[1] for t in timeline) if timeline else 0.0
        for run_id, created, begun, ended, tags in timeline:
            rel = [f"{x - zero:7.1f}" if x else "      -" for x in (created, begun, ended)]
            print(f"  run {run_id} created {rel[0]} started {rel[1]} ended {rel[2]} {tags.get('d1sync/ends_at', '')}")
    for line in skips:
        print(f"  {line}")
    if args.json:
        print(json.dumps(figures))
