"""One read batch of queue messages -> D1 statements and poison: the apply's planning, with no I/O.

A batch is planned in segments (see `core/chunks.py`): each compact backfill chunk on its own (its rows go
straight to packed upserts), and the trigger changes between two chunks coalesced per key together. The
statements keep message order, which is what applying the messages one by one would leave in D1.

`decode_batch` is the general path for every row change of a batch, used again when D1 refuses a statement
and the batch has to be bisected change by change.

With shard rules (`core/shards.py`), each change is routed before it is coalesced, and each shard's changes
are coalesced and planned apart (`Planned.shard`); order only matters within one database:
- an upsert goes to the shard of its row; when the old row (an UPDATE's `old_record`) lived in another
  shard, its key is deleted there first, exactly like a primary-key change;
- a delete goes to the shard of its old row, or to every shard of the rule when the message does not
  carry the shard column;
- a TRUNCATE goes to every shard of the rule;
- a message for one shard (`"shard"`: a repair's DELETE, a backfill of one shard) reaches only that shard,
  and of its upserts only the rows that belong there.
An UPDATE sent without its old row (the seed's backfill snippet) cannot show a move: the stale copy it may
leave in the old shard is found and removed by reconcile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from d1sync_dagster.core.changes import Change, Poison, decode, decode_all
from d1sync_dagster.core.chunks import decode_chunk
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.convert import ConversionError, to_sqlite
from d1sync_dagster.core.messages import BACKFILL
from d1sync_dagster.core.plan import Planned, plan, plan_literals, plan_upserts, row_problem
from d1sync_dagster.core.shards import ShardRule

if TYPE_CHECKING:
    from d1sync_dagster.schema import Schema, Table

Rules = Mapping[str, ShardRule]


class Message(Protocol):
    """What the planner needs of a queue message."""

    @property
    def msg_id(self) -> int: ...

    @property
    def message(self) -> Any: ...


class PlannedBatch(NamedTuple):
    """The statements of a batch in message order, the messages that cannot apply, and the table each
    message belongs to (None where it names none we know)."""

    planned: list[Planned]
    poison: list[Poison]
    tables: dict[int, str | None]


def plan_batch(schema: Schema, msgs: list[Message], rules: Rules | None = None) -> PlannedBatch:
    """Decode, size-check and plan one read batch (routed to shards by `rules`)."""
    poison: list[Poison] = []
    planned: list[Planned] = []
    pending: list[Change] = []
    tables: dict[int, str | None] = {}
    for m in msgs:
        payload = m.message
        if payload.__class__ is dict and payload.get("type") != BACKFILL:  # a trigger change: one row
            item = decode(m.msg_id, payload, schema)
            if item.__class__ is Change and item.row is not None:
                problem = row_problem(schema.table(item.table), item.row)
                if problem:
                    item = Poison(m.msg_id, f"{item.table}: {problem}", item.table)
            (pending if item.__class__ is Change else poison).append(item)  # type: ignore[arg-type]
            tables[m.msg_id] = item.table
            continue
        rule = rules.get(payload.get("table")) if rules and isinstance(payload, dict) else None
        chunk = decode_chunk(m.msg_id, payload, schema, rule)
        if chunk is None:
            changes, bad = decode_batch(schema, [m])
            pending += changes
            poison += bad
            tables[m.msg_id] = changes[0].table if changes else bad[0].table if bad else None
            continue
        if pending:
            planned += plan_changes(schema, pending, rules)
            pending = []
        tables[m.msg_id] = chunk.table.name
        only = m.message.get("shard") if rule is not None else None
        if chunk.shards is None:
            planned += plan_literals(chunk.table, chunk.literals)
        else:
            by_shard: dict[str, list[str]] = {}
            for shard, lit in zip(chunk.shards, chunk.literals, strict=True):
                if only is None or shard == only:
                    by_shard.setdefault(shard, []).append(lit)
            for shard, lits in by_shard.items():
                planned += _to_shard(plan_literals(chunk.table, lits), shard)
        for ch in chunk.changes:
            problem = row_problem(chunk.table, ch.row or {})
            if problem:
                poison.append(Poison(ch.msg_id, f"{ch.table}: {problem}", ch.table))
                continue
            shard = rule.route((ch.row or {})[rule.column]) if rule is not None else None
            if only is None or shard == only:
                planned += _to_shard(plan_upserts(chunk.table, [ch.row or {}]), shard)
        poison += chunk.poison
    if pending:
        planned += plan_changes(schema, pending, rules)
    return PlannedBatch(planned, poison, tables)


def plan_changes(schema: Schema, changes: list[Change], rules: Rules | None = None) -> list[Planned]:
    """Coalesce and plan row changes in message order: per shard when `rules` shard their tables."""
    if not rules:
        return plan(schema, coalesce(changes))
    out: list[Planned] = []
    for shard, group in route_changes(schema, rules, changes).items():
        out += _to_shard(plan(schema, coalesce(group)), shard)
    return out


def route_changes(schema: Schema, rules: Rules, changes: list[Change]) -> dict[str | None, list[Change]]:
    """Each shard's changes in message order (None: the target's own database), as the module says."""
    out: dict[str | None, list[Change]] = {}
    for c in changes:
        rule = rules.get(c.table)
        if rule is None:
            out.setdefault(None, []).append(c)
            continue
        for shard, routed in _route(schema.table(c.table), rule, c):
            out.setdefault(shard, []).append(routed)
    return out


_UNKNOWN = object()


def _old_value(table: Table, rule: ShardRule, old: dict[str, object] | None) -> object:
    """The old row's shard column, converted as D1 holds it; `_UNKNOWN` when the message does not carry it."""
    if not old or rule.column not in old:
        return _UNKNOWN
    v = old[rule.column]
    try:
        return None if v is None else to_sqlite(v, table.columns[rule.column])
    except ConversionError:
        return _UNKNOWN


def _route(table: Table, rule: ShardRule, c: Change) -> list[tuple[str, Change]]:
    everywhere = rule.shards
    if c.op == "truncate":
        return [(c.shard, c)] if c.shard is not None else [(s, c) for s in everywhere]
    if c.op == "delete":
        if c.shard is not None:
            return [(c.shard, c)]
        v = _old_value(table, rule, c.old)
        return [(s, c) for s in everywhere] if v is _UNKNOWN else [(rule.route(v), c)]
    assert c.row is not None
    new = rule.route(c.row[rule.column])
    if c.shard is not None:
        return [(new, c)] if new == c.shard else []
    v = _old_value(table, rule, c.old)
    if v is _UNKNOWN:
        if c.old_key is None:
            return [(new, c)]
        # The key moved and the old row's shard is unknown: its old key goes wherever it may be.
        gone = Change(c.msg_id, c.table, "delete", c.old_key)
        return [(s, gone) for s in everywhere if s != new] + [(new, c)]
    old = rule.route(v)
    if old == new:
        return [(new, c)]
    # The row moved to another shard: delete it from the old one, write it whole into the new one.
    gone = Change(c.msg_id, c.table, "delete", c.old_key if c.old_key is not None else c.key)
    return [(old, gone), (new, c._replace(old_key=None, unchanged=None))]


def _to_shard(planned: list[Planned], shard: str | None) -> list[Planned]:
    return planned if shard is None else [replace(p, shard=shard) for p in planned]


def decode_batch(schema: Schema, msgs: list[Message]) -> tuple[list[Change], list[Poison]]:
    """Every row change of the messages (the general path), and the ones that cannot apply."""
    changes: list[Change] = []
    poison: list[Poison] = []
    for m in msgs:
        for item in decode_all(m.msg_id, m.message, schema):
            if isinstance(item, Change) and item.row is not None:
                problem = row_problem(schema.table(item.table), item.row)
                if problem:
                    item = Poison(m.msg_id, f"{item.table}: {problem}", item.table)
            if isinstance(item, Change):
                changes.append(item)
            else:
                poison.append(item)
    return changes, poison
