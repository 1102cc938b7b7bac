"""One read batch of queue messages -> D1 statements and poison: the apply's planning, with no I/O.

A batch is planned in segments (see `core/chunks.py`): each compact backfill chunk on its own (its rows go
straight to packed upserts), and the trigger changes between two chunks coalesced per key together. The
statements keep message order, which is what applying the messages one by one would leave in D1.

`decode_batch` is the general path for every row change of a batch, used again when D1 refuses a statement
and the batch has to be bisected change by change.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from d1sync_dagster.core.changes import Change, Poison, decode_all
from d1sync_dagster.core.chunks import decode_chunk
from d1sync_dagster.core.coalesce import coalesce
from d1sync_dagster.core.plan import Planned, plan, plan_literals, plan_upserts, row_problem
from d1sync_dagster.schema import Schema


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


def plan_batch(schema: Schema, msgs: list[Message]) -> PlannedBatch:
    """Decode, size-check and plan one read batch."""
    poison: list[Poison] = []
    planned: list[Planned] = []
    pending: list[Change] = []
    tables: dict[int, str | None] = {}
    for m in msgs:
        chunk = decode_chunk(m.msg_id, m.message, schema)
        if chunk is None:
            changes, bad = decode_batch(schema, [m])
            pending += changes
            poison += bad
            tables[m.msg_id] = changes[0].table if changes else bad[0].table if bad else None
            continue
        if pending:
            planned += plan(schema, coalesce(pending))
            pending = []
        tables[m.msg_id] = chunk.table.name
        planned += plan_literals(chunk.table, chunk.literals)
        for ch in chunk.changes:
            problem = row_problem(chunk.table, ch.row or {})
            if problem:
                poison.append(Poison(ch.msg_id, f"{ch.table}: {problem}", ch.table))
            else:
                planned += plan_upserts(chunk.table, [ch.row or {}])
        poison += chunk.poison
    if pending:
        planned += plan(schema, coalesce(pending))
    return PlannedBatch(planned, poison, tables)


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
