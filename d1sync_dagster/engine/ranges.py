"""Backfill range markers, resolved by the consumer: the rows of a key range are read when the apply reaches
the marker in the queue, not when the backfill enqueues it.

A marker (its shape is in `core/messages.py`) names a table and a key range. The apply's reader thread reads
a batch of messages, then (same connection, later statement, so a later snapshot) reads each marker's range
with a plain read and replaces the marker by a compact chunk, which decodes like any chunk. The read selects each column
as `to_jsonb` renders it, as the triggers do, or the column itself where psycopg loads the same value
(`read_natively`: integers, booleans, text, jsonb, and double precision into REAL).

Why this converges, for every row x of the range (messages of one row are ordered by msg_id as they are by
commit, since a writer enqueues while holding the row lock):
- Everything applied before the marker was read in this batch or an earlier one, so it had committed before
  the range was read: the range's x is the same version or newer. The chunk never carries a row older than
  a change applied before it, which is the hazard of DBLog-style watermarks with plain reads (a writer that
  commits after the read while holding a msg_id below the marker).
- A change committed after the range was read was not visible when this batch was read, so it is applied in
  a later batch, after the chunk, whatever its msg_id: D1 ends with it.
- A change applied after the marker but older than the range's x is followed, in msg_id order, by the newer
  change of x that the range saw, so D1 ends with the newest version.

The copy costs one plain indexed read per chunk: no row locks, no big queue message, no TOAST and WAL for
it, no second pass through the queue table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core import messages
from d1sync_dagster.engine.catalog import column_types, key_types
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident

log = logging.getLogger(__name__)


def range_condition(table: Table, types: Sequence[str], *, after: bool, upto: bool) -> str:
    """`WHERE (key) > (%(k0)s::type, ...) AND (key) <= (%(u0)s::type, ...)`, either side optional."""
    keys = ", ".join(ident(k) for k in table.key)
    conds = []
    if after:
        conds.append(f"({keys}) > (" + ", ".join(f"%(k{i})s::{t}" for i, t in enumerate(types)) + ")")
    if upto:
        conds.append(f"({keys}) <= (" + ", ".join(f"%(u{i})s::{t}" for i, t in enumerate(types)) + ")")
    return ("WHERE " + " AND ".join(conds)) if conds else ""


def range_params(after: Sequence[str] | None, upto: Sequence[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if after is not None:
        params |= {f"k{i}": v for i, v in enumerate(after)}
    if upto is not None:
        params |= {f"u{i}": v for i, v in enumerate(upto)}
    return params


def enqueue_marker(
    pg: PgmqClient, table: Table, after: list[str] | None, upto: list[str] | None, rows: int, shard: str | None = None
) -> int | None:
    """Enqueue one range marker (in the caller's transaction); returns its msg_id."""
    (msg_id,) = pg.enqueue([messages.range_marker(table.name, after, upto, rows, shard)])
    return msg_id


#: Postgres types whose values psycopg loads as exactly the Python value that `loads_exact(to_jsonb(v))`
#: gives, for any column type in schema.json: integers, booleans, text (the same str) and jsonb (its text
#: is what to_jsonb returns, loaded by the same `loads_exact`).
_SAME_AS_JSON = {"smallint", "integer", "bigint", "boolean", "text", "jsonb"}


def read_natively(pg_type: str, column_type: str) -> bool:
    """Whether a range read selects the column itself rather than `to_jsonb(column)` (cheaper on both
    sides, same value after conversion). double precision only into REAL: to_jsonb spells NaN as the text
    "NaN", which a TEXT column would keep, while a REAL column refuses both alike."""
    if pg_type in _SAME_AS_JSON or pg_type.startswith("character varying"):
        return True
    return pg_type == "double precision" and column_type == "REAL"


def select_list(table: Table, types: dict[str, str] | None) -> str:
    """The table's columns for a read: natively where `read_natively` allows, else `to_jsonb(column)`, which
    renders values exactly as the capture triggers do. `types` None: every column through to_jsonb."""
    return ", ".join(
        ident(c) if types is not None and read_natively(types.get(c, ""), t) else f"to_jsonb({ident(c)})"
        for c, t in table.columns.items()
    )


def _rows_sql(table: Table, types: dict[str, str], *, after: bool, upto: bool) -> str:
    keys = ", ".join(ident(k) for k in table.key)
    where = range_condition(table, [types[k] for k in table.key], after=after, upto=upto)
    return f"SELECT {select_list(table, types)} FROM {source_relation(table)} {where} ORDER BY {keys}"


class RangeReader:
    """Resolves the markers of a read batch (see the module docstring). Used by the apply's reader thread on
    the connection that read the batch."""

    def __init__(self, pg: PgmqClient, schema: Schema, *, max_rows: int) -> None:
        self.pg, self.schema, self.max_rows = pg, schema, max_rows
        self._types: dict[str, dict[str, str]] = {}

    def resolve(self, msgs: list[QueueMessage]) -> list[QueueMessage]:
        """The batch with every marker replaced by its rows. When the markers' rows would exceed `max_rows`,
        the batch ends before the marker that does not fit; that marker and every message after it stay
        unread (the reader claims only what this returns), so the next read starts with them."""
        out: list[QueueMessage] = []
        total = 0
        for m in msgs:
            payload = m.message
            if (
                payload.__class__ is not dict
                or payload.get("type") != messages.BACKFILL
                or not messages.is_marker(payload)
            ):
                out.append(m)
                total += 1
                continue
            if out and total + messages.marker_rows(m.message) > self.max_rows:
                break
            payload = self._read(m.msg_id, m.message)
            total += len(payload.get("rows") or ())
            out.append(m._replace(message=payload))
        return out

    def _read(self, msg_id: int, marker: dict[str, Any]) -> dict[str, Any]:
        name = marker.get("table")
        table = self.schema.by_name.get(name) if isinstance(name, str) else None
        bounds = messages.marker_bounds(marker)
        if table is None or bounds is None:
            return messages.unreadable_range(name, "range marker without a known table and key range")
        after, upto = bounds
        rng = marker["range"]
        try:
            if table.name not in self._types:
                key_types(self.pg, table)  # a clear error when a key column is gone
                self._types[table.name] = column_types(self.pg, table)
            sql = _rows_sql(table, self._types[table.name], after=after is not None, upto=upto is not None)
            rows = self.pg.execute(sql, range_params(after, upto))
        except QueueError as e:
            # A range that can never be read (key text that no longer casts, a dropped column) is dead-lettered
            # with the reason; a lost connection or a timeout is raised and the batch is read again later.
            if e.sqlstate is None or not e.sqlstate.startswith(("22", "42")):
                raise
            log.warning("backfill range %s of %s cannot be read: %s", rng, table.name, e)
            return messages.unreadable_range(table.name, f"range {rng} cannot be read: {e}")
        out = messages.chunk(table.name, list(table.columns), rows)
        shard = marker.get("shard")
        return out if shard is None else out | {"shard": shard}
