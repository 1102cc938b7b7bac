"""Shared test helpers: a replicated pair (Postgres source + D1) and the row-for-row equality check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.reports import ApplyReport
from d1sync_dagster.schema import Schema


def stop_process(proc: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Pair:
    pg: PgmqClient
    d1: D1Client
    schema: Schema

    def sql(self, statement: str, params: list | None = None) -> list:
        return self.pg.execute(statement, params)

    def apply(self, **kw: object) -> ApplyReport:
        return apply(self.pg, self.d1, self.schema, ApplyOptions(**kw))  # type: ignore[arg-type]

    def assert_in_sync(self, tables: list[str] | None = None) -> None:
        """D1 equals Postgres, table by table, row for row, column for column (values and storage types)."""
        for table in self.schema.tables:
            if tables is not None and table.name not in tables:
                continue
            source, replica = pg_rows(self.pg, table), d1_rows(self.d1, table)
            drift = diff(source, replica)
            assert drift.total == 0, (
                f"{table.name}: missing {drift.missing[:5]}, extra {drift.extra[:5]}, different "
                + "; ".join(f"{k}: pg={source[k]} d1={replica[k]}" for k in drift.different[:3])
            )

    def queue_depth(self) -> int:
        return self.pg.metrics().queue_length

    def dead_letters(self) -> list[dict]:
        return [m for (m,) in self.pg.execute(f"SELECT message FROM pgmq.q_{self.pg.queue}_dlq ORDER BY msg_id")]


@contextmanager
def dagster_webserver(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`dagster-webserver -w workspace.yaml` (plus `args`) with `DAGSTER_HOME=home` on a free port; yields its
    URL once it answers, stops it after."""
    from tests.conftest import ROOT, free_port

    port = free_port()
    run_env = os.environ | {"DAGSTER_HOME": str(home), "DATABASE_URL": "postgresql://unused@127.0.0.1:1/x"}
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port), *args],
        cwd=ROOT,
        env=run_env | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("dagster-webserver did not answer within 120 s")
        yield url
    finally:
        stop_process(proc, timeout=30)


def graphql_repositories(url: str, query: str, *, timeout: float = 60) -> list[dict]:
    """The repository nodes a GraphQL `repositoriesOrError` query returns, once the webserver has loaded
    the code location (it loads in the background after the server answers)."""
    deadline = time.monotonic() + timeout
    while True:
        data = httpx.post(f"{url}/graphql", json={"query": query}, timeout=30).json()
        nodes = (data.get("data") or {}).get("repositoriesOrError", {}).get("nodes") or []
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(1)
