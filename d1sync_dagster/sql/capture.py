"""The Postgres side: queue, capture trigger functions and triggers, generated from the schema.

Design:
- Statement-level triggers with transition tables: a bulk write pays one queue write per statement instead
  of one `pgmq.send` per row. By default that write is one `INSERT ... SELECT` into the queue table
  `pgmq.q_<queue>` filling exactly the columns `pgmq.send_batch` fills (`vt`, `message`; `msg_id` and
  `enqueued_at` from their defaults), which benchmarks/trigger_overhead.py measured well ahead of building
  an array for `pgmq.send_batch` (which unnests it into the same INSERT). `via="send_batch"` generates the
  API call instead, for installs that forbid writing the queue table.
- Messages keep the seed's shape `{"record", "old_record", "type", "table"}`; `record`/`old_record` carry
  only the replicated columns (the queue never holds columns the replica does not need).
- UPDATE rows are paired old-to-new by primary key. A new row whose replicated columns equal its old row is
  skipped (a no-op update costs nothing downstream). An old key that no new row carries any more (its key
  was changed) is sent first as a DELETE, then every changed new row as an UPDATE. Replication is by state,
  so this gives the right final rows even for `UPDATE t SET id = id + 1`.
- TRUNCATE sends one TRUNCATE message, a barrier for the consumer.
- A statement that queued changes also notifies `d1sync_<queue>` (`pg_notify`, no payload): Postgres folds
  the notifications of one transaction into one, delivered at commit, and the streaming apply wakes on it.
- Functions are SECURITY DEFINER with an empty search_path, so app roles writing rows need no PGMQ rights
  and nothing can be hijacked through search_path.
- The file uses only what PGMQ 1.4 has (`create`, `send_batch(text, jsonb[])`, the `q_<queue>` table with
  `vt` and `message`), which Supabase runs.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from typing import Literal

from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.quoting import check_queue_name, ident, literal

DEFAULT_QUEUE = "replicate_data"
FUNCTION_SCHEMA = "d1sync"
#: How a statement's messages enter the queue: one INSERT into the queue table (default, measured faster in
#: benchmarks/trigger_overhead.py) or one pgmq.send_batch call.
SendVia = Literal["insert", "send_batch"]


def dlq_name(queue: str) -> str:
    """The dead-letter queue that goes with `queue`."""
    return f"{queue}_dlq"


def _short(name: str) -> str:
    """`name` when it fits Postgres' 63 bytes, else a prefix and a hash of it."""
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name.encode()[:50].decode(errors='ignore')}_{digest}"


def _suffix(queue: str) -> str:
    """What sets a queue's capture apart from another queue's on the same table. The default queue keeps
    the names every existing install has; any other queue has functions and triggers of its own, so that
    setting one deployment up, changing it or removing it leaves the others' capture as it was."""
    return "" if check_queue_name(queue) == DEFAULT_QUEUE else f"__{queue}"


def function_name(table: Table, queue: str = DEFAULT_QUEUE) -> str:
    """The capture function's name (unqualified) for `queue`, at most 63 bytes."""
    return _short(f"capture_{table.spec.source_schema}_{table.name}{_suffix(queue)}")


#: The statement events captured, each with its own trigger.
EVENTS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


def trigger_names(queue: str = DEFAULT_QUEUE) -> dict[str, str]:
    """The capture triggers' names for `queue`, by event."""
    return {event: _short(f"d1sync_capture_{event.lower()}{_suffix(queue)}") for event in EVENTS}


def source_relation(table: Table) -> str:
    """The schema-qualified, quoted source table."""
    return f"{ident(table.spec.source_schema)}.{ident(table.name)}"


def _rows(table: Table, transition: str) -> str:
    """A subquery over a transition table keeping only the replicated columns, so `to_jsonb(r)` of its rows
    is the record (one pass, any number of columns)."""
    cols = ", ".join(ident(c) for c in table.columns)
    return f"(SELECT {cols} FROM {transition}) r"


def _message(table: Table, record: str, old_record: str, op: str) -> str:
    return (
        f"pg_catalog.jsonb_build_object('record', {record}, 'old_record', {old_record}, "
        f"'type', '{op}', 'table', {literal(table.name)})"
    )


def notify_channel(queue: str) -> str:
    """The channel the capture triggers notify once per statement that queued changes, and the streaming
    apply listens on (Postgres delivers it at commit, once per transaction however many statements)."""
    return f"d1sync_{check_queue_name(queue)}"


def _enqueue(queue: str, select: str, via: SendVia) -> str:
    notify = f"PERFORM pg_catalog.pg_notify({literal(notify_channel(queue))}, '');"
    if via == "send_batch":
        return (
            f"msgs := ARRAY(SELECT m FROM ({select}) s);\n"
            f"    IF pg_catalog.cardinality(msgs) > 0 THEN\n"
            f"      PERFORM pgmq.send_batch({literal(queue)}, msgs); {notify}\n    END IF;"
        )
    # One INSERT into the queue table, with the columns pgmq.send_batch itself fills (vt, message): the
    # same rows, without building, copying and unnesting an array of every message of the statement.
    return (
        f"INSERT INTO pgmq.{ident('q_' + queue)} (vt, message)\n      SELECT pg_catalog.now(), m FROM ({select}) s;\n"
        f"    IF FOUND THEN {notify} END IF;"
    )


def capture_function(table: Table, queue: str, *, via: SendVia = "insert") -> str:
    """`CREATE OR REPLACE FUNCTION` for the table's capture trigger function of `queue`."""
    check_queue_name(queue)
    keys = ", ".join(f"r.{ident(k)} AS k{i}" for i, k in enumerate(table.key))
    join = " AND ".join(f"n.k{i} = o.k{i}" for i in range(len(table.key)))
    fn = f"{ident(FUNCTION_SCHEMA)}.{ident(function_name(table, queue))}"
    insert = (
        f"SELECT {_message(table, 'pg_catalog.to_jsonb(r)', 'NULL', 'INSERT')} AS m FROM {_rows(table, 'new_rows')}"
    )
    delete = (
        f"SELECT {_message(table, 'NULL', 'pg_catalog.to_jsonb(r)', 'DELETE')} AS m FROM {_rows(table, 'old_rows')}"
    )
    update = f"""WITH o AS (SELECT {keys}, pg_catalog.to_jsonb(r) AS r FROM {_rows(table, "old_rows")}),
           n AS (SELECT {keys}, pg_catalog.to_jsonb(r) AS r FROM {_rows(table, "new_rows")})
      SELECT m FROM (
        SELECT 0 AS ord, {_message(table, "NULL", "o.r", "DELETE")} AS m
          FROM o WHERE NOT EXISTS (SELECT 1 FROM n WHERE {join})
        UNION ALL
        SELECT 1 AS ord, {_message(table, "n.r", "o.r", "UPDATE")} AS m
          FROM n LEFT JOIN o ON {join}
          WHERE o.r IS DISTINCT FROM n.r
      ) c ORDER BY ord"""
    truncate = f"SELECT {_message(table, 'NULL', 'NULL', 'TRUNCATE')} AS m"
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $fn$
DECLARE
  msgs jsonb[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    {_enqueue(queue, insert, via)}
  ELSIF TG_OP = 'DELETE' THEN
    {_enqueue(queue, delete, via)}
  ELSIF TG_OP = 'UPDATE' THEN
    {_enqueue(queue, update, via)}
  ELSIF TG_OP = 'TRUNCATE' THEN
    {_enqueue(queue, truncate, via)}
  END IF;
  RETURN NULL;
END
$fn$;"""


_REFERENCING = {
    "INSERT": "REFERENCING NEW TABLE AS new_rows ",
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows ",
    "DELETE": "REFERENCING OLD TABLE AS old_rows ",
    "TRUNCATE": "",
}


def triggers(table: Table, queue: str = DEFAULT_QUEUE) -> str:
    """Drop-and-create the four statement-level triggers of `queue` on the source table (idempotent)."""
    rel = source_relation(table)
    fn = f"{ident(FUNCTION_SCHEMA)}.{ident(function_name(table, queue))}"
    out = []
    for event, name in trigger_names(queue).items():
        referencing = _REFERENCING[event]
        out.append(f"DROP TRIGGER IF EXISTS {ident(name)} ON {rel};")
        out.append(
            f"CREATE TRIGGER {ident(name)} AFTER {event} ON {rel}\n"
            f"  {referencing}FOR EACH STATEMENT EXECUTE FUNCTION {fn}();"
        )
    return "\n".join(out)


def queue_setup(queue: str) -> str:
    """PGMQ (extension, unless its SQL install is already there), the queue and its dead-letter queue."""
    q, dlq = literal(check_queue_name(queue)), literal(check_queue_name(dlq_name(queue)))
    return f"""-- PGMQ: the extension on Supabase; skipped where PGMQ was installed from its SQL file.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'pgmq') THEN
    CREATE EXTENSION IF NOT EXISTS pgmq;
  END IF;
END
$$;

-- The change queue and its dead-letter queue (created once).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = {q}) THEN
    PERFORM pgmq.create({q});
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = {dlq}) THEN
    PERFORM pgmq.create({dlq});
  END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS {ident(FUNCTION_SCHEMA)};

-- Backfill progress per queue and table (resumable backfills).
CREATE TABLE IF NOT EXISTS {ident(FUNCTION_SCHEMA)}.backfill_progress (
  queue text NOT NULL,
  table_name text NOT NULL,
  last_key text[],
  rows bigint NOT NULL DEFAULT 0,
  chunks bigint NOT NULL DEFAULT 0,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  PRIMARY KEY (queue, table_name)
);"""


def example_source_tables() -> str:
    """DDL of the Postgres tables that the example `schema.json` replicates (demo, tests, benchmarks)."""
    return (importlib.resources.files("d1sync_dagster.sql") / "example_source_tables.sql").read_text(encoding="utf-8")


def migration(schema: Schema, *, queue: str = DEFAULT_QUEUE, via: SendVia = "insert") -> str:
    """The whole Postgres migration for `schema`: runnable as-is in the Supabase SQL editor, idempotent."""
    parts = [
        "-- d1sync capture migration, generated by `d1sync generate-sql` from schema.json.",
        f"-- Schema version {schema.version}, queue {queue}. Do not edit: change schema.json and regenerate.",
        "",
        queue_setup(queue),
    ]
    for table in schema.tables:
        parts += [
            "",
            f"-- {table.name} -> D1 table {table.target}",
            capture_function(table, queue, via=via),
            triggers(table, queue),
        ]
    return "\n".join(parts) + "\n"


def remove_capture(table: Table, queue: str) -> str:
    """Drop `queue`'s capture triggers and function on the table (another queue's stay as they are)."""
    rel = source_relation(table)
    out = [f"DROP TRIGGER IF EXISTS {ident(name)} ON {rel};" for name in trigger_names(queue).values()]
    out.append(f"DROP FUNCTION IF EXISTS {ident(FUNCTION_SCHEMA)}.{ident(function_name(table, queue))}();")
    return "\n".join(out)
