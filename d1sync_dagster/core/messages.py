"""Every shape of message in the change queue: builders and predicates, and nothing else.

The queue carries three kinds of message, all JSON objects with a `"type"` and a `"table"`:

- **Trigger changes** (the seed's shape, kept): `{"type": "INSERT"|"UPDATE"|"DELETE"|"TRUNCATE", "table",
  "record", "old_record"}`. d1sync's capture triggers build them in SQL (`sql/capture.py`); the seed's
  per-row trigger and its backfill snippet are accepted too (`old_record` `{}` or null). Repairs build
  DELETEs here (`delete_message`).
- **Range markers**, enqueued by a backfill: `{"type": "BACKFILL", "table", "range": {"after": [key text] |
  null, "upto": [key text] | null}, "rows": <count when enqueued>}`, with `"shard"` for a backfill of one
  shard of a sharded table (its chunk keeps it: only the rows that belong to that shard are written). The
  consumer reads the range's rows when it reaches the marker (`engine/ranges.py`) and replaces the marker by a chunk.
- **Chunks**, many rows of one table: the compact form `{"type": "BACKFILL", "table", "columns": [names],
  "rows": [[values], ...]}` (what a marker resolves to), the record form `{"type": "BACKFILL", "table",
  "records": [{...}, ...]}` (repairs), or `{"type": "BACKFILL", "table", "error": "..."}` for a range that
  could not be read (dead-lettered with that reason).

How a message turns into typed changes is `core/changes.py` (general path) and `core/chunks.py` (fast path
for compact chunks); both ask this module what a message is.
"""

from __future__ import annotations

from typing import Any, Literal

BACKFILL = "BACKFILL"

Op = Literal["upsert", "delete", "truncate"]

#: Trigger change types and what each does to the row in D1.
TRIGGER_OPS: dict[str, Op] = {"INSERT": "upsert", "UPDATE": "upsert", "DELETE": "delete", "TRUNCATE": "truncate"}


def is_backfill(payload: Any) -> bool:
    """A marker or a chunk (any `BACKFILL` message)."""
    return isinstance(payload, dict) and payload.get("type") == BACKFILL


def range_marker(
    table: str, after: list[str] | None, upto: list[str] | None, rows: int, shard: str | None = None
) -> dict[str, Any]:
    """A backfill range marker: keys in `(after, upto]` as key text, `rows` counted when it was enqueued;
    with `shard`, for that shard of a sharded table only."""
    out = {"type": BACKFILL, "table": table, "range": {"after": after, "upto": upto}, "rows": rows}
    return out if shard is None else out | {"shard": shard}


def is_marker(payload: Any) -> bool:
    return is_backfill(payload) and isinstance(payload.get("range"), dict)


def marker_rows(payload: Any) -> int:
    """The rows a marker stood for when it was enqueued (at least 1)."""
    n = payload.get("rows") if isinstance(payload, dict) else None
    return n if isinstance(n, int) and n > 0 else 1


def marker_bounds(payload: dict[str, Any]) -> tuple[list[Any] | None, list[Any] | None] | None:
    """A marker's `(after, upto)` key bounds, or None when the range is malformed."""
    rng = payload.get("range")
    if not isinstance(rng, dict):
        return None
    after, upto = rng.get("after"), rng.get("upto")
    if not all(v is None or (isinstance(v, list) and v) for v in (after, upto)):
        return None
    return after, upto


def chunk(table: str, columns: list[str], rows: list[Any]) -> dict[str, Any]:
    """A compact chunk: rows as arrays under one column list."""
    return {"type": BACKFILL, "table": table, "columns": columns, "rows": rows}


def records_chunk(table: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A chunk in the record form (one object per row), as repairs enqueue it."""
    return {"type": BACKFILL, "table": table, "record": None, "old_record": None, "records": records}


def unreadable_range(table: Any, error: str) -> dict[str, Any]:
    """What a marker becomes when its range cannot be read: dead-lettered with `error`."""
    return {"type": BACKFILL, "table": table, "error": error}


def chunk_error(payload: Any) -> str | None:
    """The reason carried by an unreadable range, else None."""
    error = payload.get("error") if is_backfill(payload) else None
    return error if isinstance(error, str) else None


def is_chunk(payload: Any) -> bool:
    """A chunk in the compact form (`columns` + `rows`) that carries no error."""
    return (
        is_backfill(payload)
        and isinstance(payload.get("table"), str)
        and isinstance(payload.get("columns"), list)
        and isinstance(payload.get("rows"), list)
        and chunk_error(payload) is None
    )


def delete_message(table: str, old_record: dict[str, Any], shard: str | None = None) -> dict[str, Any]:
    """A trigger-shaped DELETE of the row whose key `old_record` holds; with `shard`, in that shard only (a
    repair of a sharded table: a stale copy in a shard the row does not belong to)."""
    out = {"type": "DELETE", "table": table, "record": None, "old_record": old_record}
    return out if shard is None else out | {"shard": shard}


def message_rows(payload: Any) -> int:
    """How many row changes a message carries: a chunk its rows, a marker its row count when enqueued, any
    other message (poison too) one. `ROW_CHANGES_SQL` counts the same inside Postgres."""
    if is_backfill(payload):
        rows = payload.get("rows", payload.get("records"))
        if isinstance(rows, int):  # a range marker not read yet
            return max(1, rows)
        return max(1, len(rows)) if isinstance(rows, list) else 1
    return 1


#: `message_rows` as an SQL expression over a queue table's `message` column.
ROW_CHANGES_SQL = """CASE
  WHEN message->>'type' IS DISTINCT FROM 'BACKFILL' THEN 1
  WHEN jsonb_typeof(message->'rows') = 'number' THEN greatest(floor((message->>'rows')::numeric), 1)::bigint
  WHEN jsonb_typeof(message->'rows') = 'array' THEN greatest(jsonb_array_length(message->'rows'), 1)
  WHEN jsonb_typeof(message->'records') = 'array' THEN greatest(jsonb_array_length(message->'records'), 1)
  ELSE 1 END"""
