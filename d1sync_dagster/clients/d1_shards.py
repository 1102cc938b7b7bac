"""Several D1 databases behind one client: a target's home database and its shards.

`ShardedD1` is a `D1Client` for the home database (unsharded tables, d1sync's bookkeeping, restore
points), and knows the shard databases and the rule of each sharded table (`core/shards.py`). The engine
asks it which databases hold a table (`databases_of`) and plans each shard's statements apart; sending them
concurrently is `send_each`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from d1sync_dagster.clients.d1 import D1Client, QueryResult
from d1sync_dagster.core.shards import ShardRule
from d1sync_dagster.core.statements import Param, Statement

T = TypeVar("T")

#: Databases written at once. D1 runs one writer per database, so parallelism only helps across databases;
#: every request still counts against the account's one API budget (the shards' HTTP clients share it).
DEFAULT_PARALLEL = 8


class ShardedD1:
    """The home database (as a `D1Client`) plus named shard databases and the rules that route to them."""

    def __init__(
        self,
        home: D1Client,
        shards: Mapping[str, D1Client],
        rules: Mapping[str, ShardRule],
        *,
        parallel: int = DEFAULT_PARALLEL,
    ) -> None:
        missing = sorted({s for r in rules.values() for s in r.shards} - set(shards))
        if missing:
            raise ValueError(f"shard rules name shard(s) with no database: {', '.join(missing)}")
        self.home = home
        self.shards = dict(shards)
        self.rules = dict(rules)
        self._pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="d1sync-shard")

    # -- D1Client: the home database --------------------------------------------------------------------
    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        return self.home.batch(statements)

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[QueryResult]:
        return self.home.query(sql, params)

    def raw(self, sql: str, params: Sequence[Param] = ()) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
        return self.home.raw(sql, params)

    def bookmark(self) -> str:
        return self.home.bookmark()

    def restore(self, bookmark: str) -> str:
        return self.home.restore(bookmark)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in (self.home, *self.shards.values()):
            c.close()

    # -- shards ------------------------------------------------------------------------------------------
    def client(self, shard: str | None) -> D1Client:
        """The database of `shard` (None: home)."""
        return self.home if shard is None else self.shards[shard]

    def databases_of(self, table: str) -> list[tuple[str | None, D1Client]]:
        """The databases holding `table`: its rule's shards, or home for an unsharded table."""
        rule = self.rules.get(table)
        if rule is None:
            return [(None, self.home)]
        return [(s, self.shards[s]) for s in rule.shards]

    def send_each(self, work: Mapping[str | None, Callable[[D1Client], T]]) -> dict[str | None, T]:
        """Run `work[shard](database)` for each shard concurrently; returns each result. When some fail,
        all are waited for and the first failure (in `work`'s order) is raised, a non-content error
        (`D1Error.bisectable` false) before a content one, so a temporary failure is never bisected."""
        if len(work) == 1:
            ((shard, fn),) = work.items()
            return {shard: fn(self.client(shard))}
        futures = {shard: self._pool.submit(fn, self.client(shard)) for shard, fn in work.items()}
        results: dict[str | None, T] = {}
        errors: list[BaseException] = []
        for shard, f in futures.items():
            try:
                results[shard] = f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after every shard has answered
                errors.append(e)
        if errors:
            errors.sort(key=lambda e: bool(getattr(e, "bisectable", False)))
            raise errors[0]
        return results


def rules_of(d1: D1Client) -> dict[str, ShardRule]:
    """The shard rules of `d1` (none for a single database)."""
    return d1.rules if isinstance(d1, ShardedD1) else {}


def databases_of(d1: D1Client, table: str) -> list[tuple[str | None, D1Client]]:
    """The databases holding `table`: `[(None, d1)]` unless `d1` shards it."""
    return d1.databases_of(table) if isinstance(d1, ShardedD1) else [(None, d1)]


def all_databases(d1: D1Client) -> list[tuple[str | None, D1Client]]:
    """Home first, then every shard."""
    if not isinstance(d1, ShardedD1):
        return [(None, d1)]
    return [(None, d1.home), *d1.shards.items()]
