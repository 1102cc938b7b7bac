"""Targets: several D1 databases fed from one Postgres, each by a queue of its own.

`targets.json` (path in `D1SYNC_TARGETS`; without it, one target from today's variables, unchanged):

    {
      "production": {"queue": "replicate_data",
                     "d1": {"accountIdEnv": "PROD_CLOUDFLARE_ACCOUNT_ID",
                            "databaseIdEnv": "PROD_CLOUDFLARE_D1_DATABASE_ID",
                            "apiTokenEnv": "PROD_CLOUDFLARE_API_TOKEN"}},
      "staging":    {"queue": "replicate_staging", "tables": ["apps"],
                     "d1": {"localPath": ".d1sync/staging.sqlite"}}
    }

Each target names its queue (its dead-letter queue is `<queue>_dlq`; queues differ between targets), the
tables of `schema.json` it replicates (default all) and its D1: the *names* of the environment variables
that hold its Cloudflare account id, database id and token (never the values), or a local SQLite file. A
table in several targets is captured into each target's queue (capture per queue, `sql/capture.py`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

from d1sync_dagster import config
from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import ShardedD1
from d1sync_dagster.core.shards import SHARD_COLUMN_TYPES, ShardRule, rule_from_json
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.quoting import check_queue_name

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,29}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _D1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    account_id_env: str | None = Field(default=None, alias="accountIdEnv")
    database_id_env: str | None = Field(default=None, alias="databaseIdEnv")
    api_token_env: str | None = Field(default=None, alias="apiTokenEnv")
    local_path: str | None = Field(default=None, alias="localPath")

    @model_validator(mode="after")
    def _one_backend(self) -> _D1:
        names = [self.account_id_env, self.database_id_env, self.api_token_env]
        if any(names) and not all(names):
            raise ValueError("d1 needs all three of accountIdEnv, databaseIdEnv and apiTokenEnv, or localPath")
        if all(names) and self.local_path:
            raise ValueError("d1 takes either the three *Env names or localPath, not both")
        if not all(names) and not self.local_path:
            raise ValueError("d1 needs accountIdEnv, databaseIdEnv and apiTokenEnv, or localPath")
        for n in names:
            if n and not _ENV.match(n):
                raise ValueError(f"{n!r} is not an environment variable name (it should name one, not hold a value)")
        return self


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    queue: str
    tables: list[str] | None = None
    d1: _D1
    shards: dict[str, _D1] | None = None
    shard_by: dict[str, dict[str, Any]] | None = Field(default=None, alias="shardBy")


class _TargetsFile(RootModel[dict[str, _Target]]):
    pass


@dataclass(frozen=True)
class Target:
    """One D1 database and its queue. `name` is None for the single target of a setup without targets."""

    name: str | None
    queue: str
    tables: tuple[str, ...]
    account_id_env: str | None = None
    database_id_env: str | None = None
    api_token_env: str | None = None
    local_path: str | None = None
    #: Shard databases by name (each a Target holding only its D1), and the rule of each sharded table.
    shards: tuple[tuple[str, Target], ...] = ()
    rules: tuple[ShardRule, ...] = ()

    @property
    def label(self) -> str:
        return self.name or "default"

    def schema(self, schema: Schema) -> Schema:
        """The part of `schema` this target replicates."""
        return Schema(tables=tuple(t for t in schema.tables if t.name in self.tables))

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables `config.d1_settings` reads, as this target's D1 needs them."""
        env = dict(os.environ if env is None else env)
        for k in (*config.CLOUDFLARE_VARS, "D1_LOCAL_PATH"):
            env.pop(k, None)
        if self.local_path:
            env["D1_LOCAL_PATH"] = self.local_path
            return env
        for var, source in zip(
            config.CLOUDFLARE_VARS, (self.account_id_env, self.database_id_env, self.api_token_env), strict=True
        ):
            if source and env.get(source):
                env[var] = env[source]
        missing = [s for s in (self.account_id_env, self.database_id_env, self.api_token_env) if s and not env.get(s)]
        if missing:
            raise ConfigError(f"target {self.label}: the environment has no {', '.join(missing)}")
        return env

    def d1_settings(self, env: Mapping[str, str] | None = None) -> config.D1Settings:
        return config.d1_settings(self.environment(env))

    def shards_json(self) -> str | None:
        """The shard databases (variable names or paths, never values) and rules, as the D1 resource keeps
        them; None without shards. `open_shards` reads it back."""
        if not self.shards:
            return None
        return json.dumps(
            {
                "shards": {name: _d1_json(t) for name, t in self.shards},
                "shardBy": {r.table: r.to_json() for r in self.rules},
            },
            sort_keys=True,
        )


def _d1_json(t: Target) -> dict[str, str]:
    if t.local_path:
        return {"localPath": t.local_path}
    return {
        "accountIdEnv": t.account_id_env or "",
        "databaseIdEnv": t.database_id_env or "",
        "apiTokenEnv": t.api_token_env or "",
    }


def _d1_target(name: str, d1: _D1) -> Target:
    return Target(
        name=name,
        queue="",
        tables=(),
        account_id_env=d1.account_id_env,
        database_id_env=d1.database_id_env,
        api_token_env=d1.api_token_env,
        local_path=d1.local_path,
    )


def open_shards(home: D1Client, shards_json: str | None, env: Mapping[str, str] | None = None) -> D1Client:
    """`home` alone, or with the shard databases and rules of `shards_json` (`Target.shards_json`) as one
    `ShardedD1`. Shards reached with the same token as another share its API budget. When a shard cannot be
    opened, every client opened so far, `home` too, is closed."""
    if not shards_json:
        return home
    data = json.loads(shards_json)
    clients: dict[str, D1Client] = {}
    budgets: dict[str, Any] = {}
    try:
        for name, spec in data["shards"].items():
            client = _d1_target(name, _D1.model_validate(spec)).d1_settings(env).client()
            token = spec.get("apiTokenEnv")
            if token and hasattr(client, "budget"):
                client.budget = budgets.setdefault(token, client.budget)
            clients[name] = client
    except BaseException:
        for c in (home, *clients.values()):
            c.close()
        raise
    rules = {t: rule_from_json(t, r) for t, r in data["shardBy"].items()}
    return ShardedD1(home, clients, rules, parallel=config.shard_parallel(env))


def open_d1(target: Target, env: Mapping[str, str] | None = None) -> D1Client:
    """A client for the target's D1: its database, with its shards when it has any."""
    return open_shards(target.d1_settings(env).client(), target.shards_json(), env)


def targets_path(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("D1SYNC_TARGETS") or None


def load_targets(schema: Schema, path: str | Path | None = None) -> list[Target]:
    """The targets of `path` (default `D1SYNC_TARGETS`), or the one target of today's variables."""
    path = path or targets_path()
    if path is None:
        return [Target(name=None, queue=config.queue_name(), tables=tuple(schema.names))]
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read targets file {str(p)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p.name}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        parsed = _TargetsFile.model_validate(data).root
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{p.name}: {where}: {first['msg']}") from None
    if not parsed:
        raise ConfigError(f"{p.name}: no targets")
    _one_file_each(p.name, parsed)
    out, queues = [], {}
    for name, t in parsed.items():
        if not _NAME.match(name):
            raise ConfigError(f"{p.name}: target name {name!r}: use lower-case letters, digits and _, at most 30")
        try:
            check_queue_name(t.queue)
        except Exception as e:
            raise ConfigError(f"{p.name}: target {name}: {e}") from None
        if t.queue in queues:
            raise ConfigError(f"{p.name}: targets {queues[t.queue]} and {name} both use queue {t.queue}: one each")
        queues[t.queue] = name
        tables = tuple(t.tables) if t.tables is not None else tuple(schema.names)
        unknown = [x for x in tables if x not in schema.names]
        if unknown or not tables:
            raise ConfigError(
                f"{p.name}: target {name}: "
                + (f"tables {', '.join(unknown)} are not in schema.json" if unknown else "no tables")
            )
        shards, rules = _shards(p.name, name, t, schema, tables)
        out.append(
            Target(
                name=name,
                queue=t.queue,
                tables=tables,
                account_id_env=t.d1.account_id_env,
                database_id_env=t.d1.database_id_env,
                api_token_env=t.d1.api_token_env,
                local_path=t.d1.local_path,
                shards=shards,
                rules=rules,
            )
        )
    return out


def _one_file_each(file: str, parsed: dict[str, _Target]) -> None:
    """Refuse two databases (targets or shards) on one local file, however its paths are spelled
    (`/x/same.sqlite`, `/x/./same.sqlite`, a symlink): both would write one file, and no repair converges."""
    seen: dict[str, str] = {}
    for name, t in parsed.items():
        for shard, d in (("", t.d1), *(t.shards or {}).items()):
            if not d.local_path:
                continue
            where = f"target {name}" + (f", shard {shard}" if shard else "")
            real = os.path.realpath(os.path.abspath(os.path.expanduser(d.local_path)))
            if real in seen:
                raise ConfigError(
                    f"{file}: {seen[real]} and {where} use one local file ({real}): each database needs its own "
                    "localPath"
                )
            seen[real] = where


def _shards(
    file: str, name: str, t: _Target, schema: Schema, tables: tuple[str, ...]
) -> tuple[tuple[tuple[str, Target], ...], tuple[ShardRule, ...]]:
    """The target's shard databases and rules, checked against schema.json."""
    where = f"{file}: target {name}"
    shards = t.shards or {}
    if t.shard_by and not shards:
        raise ConfigError(f"{where}: shardBy needs `shards`, the databases rows are spread over")
    for s in shards:
        if not _NAME.match(s):
            raise ConfigError(f"{where}: shard name {s!r}: use lower-case letters, digits and _, at most 30")
    rules = []
    for table, data in (t.shard_by or {}).items():
        if table not in tables:
            raise ConfigError(f"{where}: shardBy.{table}: not a table of this target")
        try:
            rule = rule_from_json(table, data)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        spec = schema.table(table)
        kind = spec.columns.get(rule.column)
        if kind is None:
            raise ConfigError(f"{where}: shardBy.{table}: {rule.column!r} is not a column of {table} in schema.json")
        if kind not in SHARD_COLUMN_TYPES:
            raise ConfigError(
                f"{where}: shardBy.{table}: column {rule.column} is {kind}; a shard column is "
                f"{', '.join(SHARD_COLUMN_TYPES)} (values with one spelling in every reader)"
            )
        unknown = [s for s in rule.shards if s not in shards]
        if unknown:
            raise ConfigError(f"{where}: shardBy.{table}: shard(s) {', '.join(unknown)} are not in `shards`")
        rules.append(rule)
    return tuple((s, _d1_target(s, d)) for s, d in shards.items()), tuple(rules)


def pick(targets: list[Target], name: str | None) -> Target:
    """The target called `name` (the only one when `name` is None and there is one)."""
    if name is None:
        if len(targets) == 1:
            return targets[0]
        raise ConfigError(f"several targets are configured ({', '.join(t.label for t in targets)}): pass --target")
    for t in targets:
        if t.label == name:
            return t
    raise ConfigError(f"no target {name!r} (configured: {', '.join(t.label for t in targets)})")
