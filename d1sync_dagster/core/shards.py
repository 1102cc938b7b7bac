"""Shards: which of a target's D1 databases holds a row of a sharded table. Pure; the engine and readers
(`readers/shard.ts`, and `shard_for` here) route with exactly this function.

A rule names the table's shard column and how its value picks a shard:
- `map`: an explicit value -> shard map (per-tenant databases), keyed by the value's *key text*;
- `hash`: a list of shards; a value goes to `hash[jump(key_hash(text), len(hash))]` (jump consistent hash,
  Lamping and Veach 2014): growing the list by appending shards moves only the rows that now belong to the
  new shards (from 4 to 6, a third of them), and no row moves between the old ones;
- `default`: the shard of every value the map does not name (with `map` and without `hash`).
A map may be combined with a hash: mapped values go to their shard, every other value is hashed.

The key text of a value is what D1 holds in the column, as text: an INTEGER or BOOLEAN column's integer in
decimal (`42`, `-7`, `1` for true), a TEXT column's text as it is (UUIDs lower-case, as d1sync stores them).
NULL has the key text `""` (so a NULL and an empty text land on the same shard, like any equal key texts).
The key hash is 64-bit FNV-1a over the UTF-8 bytes of the key text, then splitmix64's finalizer.

Every row lives in exactly one shard: the function is total (a map rule without `hash` needs `default`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_MASK = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3

#: Column types a shard column may have (their values have one key text in every language).
SHARD_COLUMN_TYPES = ("INTEGER", "TEXT", "BOOLEAN")


def key_text(value: Any) -> str:
    """The key text of a column value as D1 holds it (see the module's docstring)."""
    if value is None:
        return ""
    if value is True or value is False:
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"a shard column holds integers or text, not {type(value).__name__}")


def key_hash(text: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes, then splitmix64's finalizer (spreads the high bits jump uses)."""
    h = _FNV_OFFSET
    for b in text.encode():
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def jump(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in [0, buckets) of a 64-bit key. The float steps are IEEE doubles,
    the same in every language."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK
        j = int((b + 1) * (2147483648.0 / float((key >> 33) + 1)))
    return b


@dataclass(frozen=True)
class ShardRule:
    """How one table's rows are spread over shards (see the module's docstring)."""

    table: str
    column: str
    map: tuple[tuple[str, str], ...] = ()
    hash: tuple[str, ...] = ()
    default: str | None = None
    _cache: dict[Any, str] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.hash and self.default is None:
            raise ValueError(f"shard rule of {self.table}: give `hash` (a list of shards) or `default`")
        if self.hash and self.default is not None:
            raise ValueError(f"shard rule of {self.table}: `default` or `hash`, not both (unmapped values are hashed)")
        if len(set(self.hash)) != len(self.hash):
            raise ValueError(f"shard rule of {self.table}: `hash` names a shard twice")

    @property
    def shards(self) -> tuple[str, ...]:
        """Every shard this rule can route to, in a stable order (the hash list first)."""
        out = dict.fromkeys(self.hash)
        if self.default is not None:
            out[self.default] = None
        for _, s in self.map:
            out[s] = None
        return tuple(out)

    def route_text(self, text: str) -> str:
        for k, s in self.map:
            if k == text:
                return s
        if self.hash:
            return self.hash[jump(key_hash(text), len(self.hash))]
        assert self.default is not None
        return self.default

    def route(self, value: Any) -> str:
        """The shard of a row whose shard column holds `value` (converted, as in D1). Cached per value: shard
        columns are mostly tenant ids, few and repeated."""
        try:
            return self._cache[value]
        except KeyError:
            pass
        except TypeError:  # pragma: no cover - values are hashable scalars
            return self.route_text(key_text(value))
        shard = self.route_text(key_text(value))
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[value] = shard
        return shard

    def to_json(self) -> dict[str, Any]:
        """The rule as readers load it (`readers/shard.ts`)."""
        out: dict[str, Any] = {"column": self.column}
        if self.map:
            out["map"] = dict(self.map)
        if self.hash:
            out["hash"] = list(self.hash)
        if self.default is not None:
            out["default"] = self.default
        return out


def rule_from_json(table: str, data: dict[str, Any]) -> ShardRule:
    """A rule from its JSON form (`{"column", "map"?, "hash"?, "default"?}`); raises ValueError."""
    unknown = set(data) - {"column", "map", "hash", "default"}
    if unknown:
        raise ValueError(f"shard rule of {table}: unknown field(s) {', '.join(sorted(unknown))}")
    column = data.get("column")
    if not isinstance(column, str) or not column:
        raise ValueError(f"shard rule of {table}: `column` names the shard column")
    mapping = data.get("map") or {}
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"shard rule of {table}: `map` is an object of key text to shard name")
    hashed = data.get("hash") or []
    if not isinstance(hashed, list) or not all(isinstance(s, str) for s in hashed):
        raise ValueError(f"shard rule of {table}: `hash` is a list of shard names")
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise ValueError(f"shard rule of {table}: `default` is a shard name")
    return ShardRule(table, column, tuple(mapping.items()), tuple(hashed), default)


def shard_for(rule: dict[str, Any], value: Any) -> str:
    """For readers in Python: the shard holding the row whose shard column is `value`. `rule` is the rule's
    JSON form, as in targets.json (or `d1sync shards --json`)."""
    return rule_from_json("table", rule).route(value)


def spread(rule: ShardRule, values: Iterable[Any]) -> dict[str, int]:
    """How many of `values` each shard gets (benchmarks and docs)."""
    out = dict.fromkeys(rule.shards, 0)
    for v in values:
        out[rule.route(v)] += 1
    return out
