"""`d1sync dev`: the first run. Sets up capture and D1, starts the Dagster UI and daemon (the two processes
`dagster dev` runs, started directly so that Ctrl-C and SIGTERM stop them promptly) and, on the embedded
defaults, a small generator of live writes into the example tables. The sensor sees the queue fill, starts
apply runs, and the `d1/*` assets materialize with their checks.

Ctrl-C (or SIGTERM) stops what it started: the generator, the Dagster processes with their code servers and
run workers (each started in its own process group), and the embedded Postgres when it started one.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psycopg
import psycopg.conninfo
import psycopg.sql

from d1sync_dagster import config, embedded
from d1sync_dagster.clients.pgmq import PgmqClient, scrub
from d1sync_dagster.engine.demo import live_writes
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import Schema, load_schema
from d1sync_dagster.sql.capture import example_source_tables

#: Telemetry off; one consumer per target (its steps that consume the queue share the pool
#: `d1sync[_<target>]`); queued runs launched every second, not every 5 s (a sensor-started apply run
#: otherwise waits up to 5 s in the queue).
DAGSTER_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""
CODE_LOCATION = ["-m", "d1sync_dagster.definitions", "-a", "defs"]


@dataclass
class DevOptions:
    schema_file: str
    queue: str
    host: str = "127.0.0.1"
    port: int = 3000
    writes: bool | None = None  # None: only on the embedded Postgres, never into a database you configured
    rows_per_tick: int = 20
    tick_seconds: float = 2.0
    sensor_interval_seconds: int = 5
    stop_after_seconds: float | None = None
    #: Keep the Dagster instance in Postgres (a database of its own on the source's server), as production
    #: does (docs/deploy.md), instead of SQLite files.
    instance_postgres: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} is not installed (it comes with the dagster-webserver and dagster packages)")
    return found


def _stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL whatever is left in it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # children of the group (code servers, run workers) may still exit
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def host_warning(host: str) -> str | None:
    """The warning for a UI that listens beyond this machine (None for a loopback address)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from elsewhere
        loopback = False
    if loopback:
        return None
    allowed = config.allow_destructive()
    return (
        f"WARNING: the Dagster UI will listen on {host}, reachable from other machines, and it has no login: "
        "anyone who can reach it can launch runs"
        + (", including d1sync_nuke, because D1SYNC_ALLOW_DESTRUCTIVE is on" if allowed else "")
        + ". Keep --host 127.0.0.1, or put the UI behind an authenticating proxy (docs/deploy.md)."
    )


def check_port(host: str, port: int) -> None:
    """Refuse (ConfigError) a port another program listens on, before anything starts: the webserver would
    fail only seconds later, after the UI's address had been printed (somebody else's page)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"cannot use --host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the webserver does: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"port {port} on {host} is already in use ({e.strerror or e}): another Dagster UI or another "
                f"program listens there. Stop it, or choose a free port with d1sync dev --port N"
            ) from None


def run_dev(opts: DevOptions, *, install_signal_handlers: bool = True) -> int:
    """Set up, start the Dagster webserver and daemon, write example changes until stopped; exit code."""
    check_port(opts.host, opts.port)
    warning = host_warning(opts.host)
    if warning:
        opts.out.write("\n" + "!" * 80 + "\n" + warning + "\n" + "!" * 80 + "\n\n")
        opts.out.flush()
    schema = load_schema(opts.schema_file)
    state = config.state_dir().resolve()
    state.mkdir(parents=True, exist_ok=True)
    pgdata = embedded.pgdata().resolve()
    use_embedded = not config.database_url()
    # An embedded Postgres that was already running (another d1sync command, another `d1sync dev`) is left
    # running: only the one started here is stopped at the end.
    ours = use_embedded and not embedded.running(pgdata)
    writes = use_embedded if opts.writes is None else opts.writes
    stop = threading.Event()
    if install_signal_handlers:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    def say(line: str) -> None:
        opts.out.write(line + "\n")
        opts.out.flush()

    procs: dict[str, subprocess.Popen] = {}
    home = state / "dagster"
    # Not under DAGSTER_HOME: Dagster's telemetry thread renames, uploads and deletes $DAGSTER_HOME/logs.
    logs = state / "logs"
    try:
        if ours:
            say(f"starting the embedded Postgres in {pgdata} (no DATABASE_URL set)")
        elif use_embedded:
            say(f"using the embedded Postgres already running in {pgdata} (no DATABASE_URL set)")
        url = embedded.source_url()
        d1_settings = config.d1_settings()
        with PgmqClient(url, queue=opts.queue) as pg:
            tables = _setup(pg, d1_settings, schema, create_example_tables=writes)
            say(f"setup done: tables {', '.join(tables)}, queue {opts.queue}, D1 backend {d1_settings.backend}")
            procs |= _start_dagster(opts, logs, _dagster_env(opts, url, home, state, d1_settings))
            say(f"Dagster UI: http://{opts.host}:{opts.port}  (logs in {logs}; Ctrl-C stops everything)")
            if writes:
                say(f"writing {opts.rows_per_tick} new apps plus updates and deletes every {opts.tick_seconds:g}s")
            return _run_until_stopped(opts, pg, procs, logs, url=url, writes=writes, stop=stop, say=say)
    finally:
        # The daemon first (no run is launched any more), the code server last: the runs it started stop
        # cleanly on the signal and report to the instance while the others still stand.
        for p in reversed(procs.values()):
            _stop_group(p)
        if ours:
            embedded.stop(pgdata)
        if procs:
            say("stopped the Dagster processes" + (" and the embedded Postgres" if ours else ""))
        if use_embedded and not ours:
            say("the embedded Postgres was running before and keeps running")


def _setup(pg: PgmqClient, d1_settings: config.D1Settings, schema: Schema, *, create_example_tables: bool) -> list[str]:
    """Capture in Postgres and the tables in D1, as `d1sync setup` does (plus the example tables when dev
    writes into them)."""
    if create_example_tables:
        pg.execute(example_source_tables())
    with closing(d1_settings.client()) as d1:
        return setup(pg, d1, schema).tables


def _dagster_env(opts: DevOptions, url: str, home: Path, state: Path, d1_settings: config.D1Settings) -> dict[str, str]:
    """The environment of the Dagster processes: this run's database, schema, queue, D1 and instance."""
    home.mkdir(parents=True, exist_ok=True)
    instance = DAGSTER_YAML
    storage: dict[str, str] = {}
    if opts.instance_postgres:
        storage_url = instance_database(url)
        instance += postgres_storage_yaml(storage_url)
        storage = {"DAGSTER_PG_PASSWORD": psycopg.conninfo.conninfo_to_dict(storage_url).get("password") or ""}
    (home / "dagster.yaml").write_text(instance, encoding="utf-8")
    env = (
        os.environ
        | storage
        | {
            "DATABASE_URL": url,
            "DAGSTER_HOME": str(home),
            "D1SYNC_SCHEMA": str(Path(opts.schema_file).resolve()),
            "D1SYNC_QUEUE": opts.queue,
            "D1SYNC_STATE_DIR": str(state),
            "D1SYNC_SENSOR_INTERVAL_SECONDS": os.environ.get(
                "D1SYNC_SENSOR_INTERVAL_SECONDS", str(opts.sensor_interval_seconds)
            ),
        }
    )
    if d1_settings.local_path:
        env["D1_LOCAL_PATH"] = str(Path(d1_settings.local_path).resolve())
    return env


#: The database `d1sync dev --instance-postgres` keeps Dagster's instance in, on the source's server.
INSTANCE_DATABASE = "d1sync_dagster_instance"


def instance_database(url: str, name: str = INSTANCE_DATABASE) -> str:
    """The URL of database `name` on `url`'s server, created when missing (Dagster's storage apart from the
    replicated tables)."""
    with psycopg.connect(url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(url, dbname=name)


def postgres_storage_yaml(storage_url: str) -> str:
    """The production pieces of a dagster.yaml (docs/deploy.md): Postgres storage named by its parts, the
    password from `DAGSTER_PG_PASSWORD` (never written into the file), and run monitoring. The scheme is
    psycopg2's: SQLAlchemy 2.1 takes psycopg 3 (which d1sync installs) for a plain postgresql:// URL, and
    dagster-postgres's NOTIFY with a bound parameter then fails ("syntax error at or near $1")."""
    part = psycopg.conninfo.conninfo_to_dict(storage_url)
    host = str(part.get("host") or "127.0.0.1")
    # A Unix socket directory (the embedded Postgres) goes in the URL's query, not as a host name.
    where = (
        f"      hostname: ''\n      params:\n        host: {host}\n"
        if host.startswith("/")
        else f"      hostname: {host}\n"
    )
    return (
        "storage:\n  postgres:\n    postgres_db:\n"
        f"{where}      port: {part.get('port') or 5432}\n"
        f"      username: {part.get('user') or 'postgres'}\n      db_name: {part['dbname']}\n"
        "      password: {env: DAGSTER_PG_PASSWORD}\n"
        "      scheme: postgresql+psycopg2\n"
        "run_monitoring:\n  enabled: true\n  poll_interval_seconds: 5\n  start_timeout_seconds: 120\n"
    )


def _start_dagster(opts: DevOptions, logs: Path, env: dict[str, str]) -> dict[str, subprocess.Popen]:
    """A code server, `dagster-webserver` and `dagster-daemon`, each in its own process group, logging into
    `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    # The instance's storage first, in one process: the webserver and the daemon both create the SQLite
    # storage of a new DAGSTER_HOME when they start, and two processes creating it at once can fail.
    with open(logs / "instance.log", "ab") as log:
        done = subprocess.run(
            [_executable("dagster"), "instance", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    if done.returncode:
        tail = scrub(_tail(logs / "instance.log"), env["DATABASE_URL"])
        raise ConfigError(f"could not prepare the Dagster instance in {env['DAGSTER_HOME']}:\n{tail}")
    # One code server of our own that the webserver and the daemon both use: left to the daemon, its
    # workspace reloads every 60 s (Dagster's RELOAD_WORKSPACE_INTERVAL) start a new code server each time
    # and the old one logs "No heartbeat received in 20 seconds, shutting down" as it goes.
    grpc_port = _free_port()
    grpc = ["--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port)]
    commands = {
        "code-server": [_executable("dagster"), "code-server", "start", *CODE_LOCATION, "-h", "127.0.0.1",
                        "-p", str(grpc_port)],
        "webserver": [_executable("dagster-webserver"), *grpc, "-h", opts.host, "-p", str(opts.port)],
        "daemon": [_executable("dagster-daemon"), "run", *grpc],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen] = {}
    for name, argv in commands.items():
        with open(logs / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        if name == "code-server":
            _wait_for_port(grpc_port, procs[name], logs / "code-server.log")
    return procs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 120.0) -> None:
    """Until the code server accepts connections (it loads the definitions first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the Dagster code server stopped while loading the definitions:\n{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(f"the Dagster code server did not answer within {seconds:g}s:\n{_tail(log)}")


def _run_until_stopped(
    opts: DevOptions,
    pg: PgmqClient,
    procs: dict[str, subprocess.Popen],
    logs: Path,
    *,
    url: str,
    writes: bool,
    stop: threading.Event,
    say: Callable[[str], None],
) -> int:
    """Write example changes every tick and report the queue every 10 s, until stopped, the time is up
    (0) or a Dagster process exits (3)."""
    started = time.monotonic()
    last_report = 0.0
    ticks = 0
    while not stop.is_set():
        for name, p in procs.items():
            if p.poll() is not None:
                log = logs / f"{name}.log"
                tail = scrub(_tail(log), url)
                say(f"dagster {name} exited with code {p.returncode}; see {log}. Its last lines:\n{tail}")
                return 3
        now = time.monotonic()
        if now - last_report >= 10:
            # Before this tick's writes: what the streaming apply left of the earlier ones (read just after
            # a write, the depth was always that write's own changes, as if nothing had been applied).
            m = pg.metrics()
            say(f"[{now - started:5.0f}s] {ticks} write ticks, queue depth {m.queue_length}")
            last_report = now
        if writes:
            live_writes(pg, rows=opts.rows_per_tick)
            ticks += 1
        if opts.stop_after_seconds is not None and now - started >= opts.stop_after_seconds:
            break
        stop.wait(opts.tick_seconds)
    say("stopping")
    return 0


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log (the reason a process stopped), indented."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"  (cannot read it: {e})"
    return "\n".join("  " + line for line in text)
