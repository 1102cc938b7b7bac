"""The Postgres side: queue, capture trigger functions and triggers, generated from the schema.

Design:
- Statement-level triggers with transition tables, one `pgmq.send_batch` per statement, so a bulk write
  pays one queue call instead of one per row.
- Messages keep the seed's shape `{"record", "old_record", "type", "table"}`; `record`/`old_record` carry
  only the replicated columns (the queue never holds columns the replica does not need).
- UPDATE rows are paired old-to-new by primary key. A new row whose replicated columns equal its old row is
  skipped (a no-op update costs nothing downstream). An old key that no new row carries any more (its key
  was changed) is sent first as a DELETE, then every changed new row as an UPDATE. Replication is by state,
  so this gives the right final rows even for `UPDATE t SET id = id + 1`.
- TRUNCATE sends one TRUNCATE message, a barrier for the consumer.
- Functions are SECURITY DEFINER with an empty search_path, so app roles writing rows need no PGMQ rights
  and nothing can be hijacked through search_path.
- The file uses only what PGMQ 1.4 has (`create`, `send`, `send_batch(text, jsonb[])`), which Supabase runs.
"""

from __future__ import annotations

import hashlib

from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.quoting import check_queue_name, ident, literal

DEFAULT_QUEUE = "replicate_data"
FUNCTION_SCHEMA = "d1sync"
# jsonb_build_object takes at most 100 arguments (50 pairs); longer column lists are concatenated.
_PAIRS_PER_CALL = 50


def dlq_name(queue: str) -> str:
    """The dead-letter queue that goes with `queue`."""
    return f"{queue}_dlq"


def function_name(table: Table) -> str:
    """The capture function's name (unqualified), at most 63 bytes."""
    name = f"capture_{table.spec.source_schema}_{table.name}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name.encode()[:50].decode(errors='ignore')}_{digest}"


def source_relation(table: Table) -> str:
    """The schema-qualified, quoted source table."""
    return f"{ident(table.spec.source_schema)}.{ident(table.name)}"


def record_expr(table: Table, alias: str) -> str:
    """A jsonb object of the replicated columns of row `alias`."""
    pairs = [f"{literal(c)}, {alias}.{ident(c)}" for c in table.columns]
    calls = [
        "pg_catalog.jsonb_build_object(" + ", ".join(pairs[i : i + _PAIRS_PER_CALL]) + ")"
        for i in range(0, len(pairs), _PAIRS_PER_CALL)
    ]
    return " || ".join(calls)


def _message(table: Table, record: str, old_record: str, op: str) -> str:
    return (
        f"pg_catalog.jsonb_build_object('record', {record}, 'old_record', {old_record}, "
        f"'type', '{op}', 'table', {literal(table.name)})"
    )


def capture_function(table: Table, queue: str) -> str:
    """`CREATE OR REPLACE FUNCTION` for the table's capture trigger function."""
    q = literal(check_queue_name(queue))
    keys = [f"{ident(k)} AS k{i}" for i, k in enumerate(table.key)]
    join = " AND ".join(f"n.k{i} = o.k{i}" for i in range(len(table.key)))
    o_cols = ", ".join(f"o.{k}" for k in keys)
    n_cols = ", ".join(f"n.{k}" for k in keys)
    fn = f"{ident(FUNCTION_SCHEMA)}.{ident(function_name(table))}"
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $fn$
DECLARE
  msgs jsonb[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT pg_catalog.array_agg({_message(table, record_expr(table, "n"), "NULL", "INSERT")})
      INTO msgs FROM new_rows n;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT pg_catalog.array_agg({_message(table, "NULL", record_expr(table, "o"), "DELETE")})
      INTO msgs FROM old_rows o;
  ELSIF TG_OP = 'UPDATE' THEN
    WITH o AS (SELECT {o_cols}, {record_expr(table, "o")} AS r FROM old_rows o),
         n AS (SELECT {n_cols}, {record_expr(table, "n")} AS r FROM new_rows n)
    SELECT pg_catalog.array_agg(m ORDER BY ord) INTO msgs FROM (
      SELECT 0 AS ord, {_message(table, "NULL", "o.r", "DELETE")} AS m
        FROM o WHERE NOT EXISTS (SELECT 1 FROM n WHERE {join})
      UNION ALL
      SELECT 1 AS ord, {_message(table, "n.r", "o.r", "UPDATE")} AS m
        FROM n LEFT JOIN o ON {join}
        WHERE o.r IS DISTINCT FROM n.r
    ) changes;
  ELSIF TG_OP = 'TRUNCATE' THEN
    msgs := ARRAY[{_message(table, "NULL", "NULL", "TRUNCATE")}];
  END IF;
  IF msgs IS NOT NULL THEN
    PERFORM pgmq.send_batch({q}, msgs);
  END IF;
  RETURN NULL;
END
$fn$;"""


def triggers(table: Table) -> str:
    """Drop-and-create the four statement-level triggers on the source table (idempotent)."""
    rel = source_relation(table)
    fn = f"{ident(FUNCTION_SCHEMA)}.{ident(function_name(table))}"
    specs = [
        ("d1sync_capture_insert", "INSERT", "REFERENCING NEW TABLE AS new_rows "),
        ("d1sync_capture_update", "UPDATE", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "),
        ("d1sync_capture_delete", "DELETE", "REFERENCING OLD TABLE AS old_rows "),
        ("d1sync_capture_truncate", "TRUNCATE", ""),
    ]
    out = []
    for name, event, referencing in specs:
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

CREATE SCHEMA IF NOT EXISTS {ident(FUNCTION_SCHEMA)};"""


def migration(schema: Schema, *, queue: str = DEFAULT_QUEUE) -> str:
    """The whole Postgres migration for `schema`: runnable as-is in the Supabase SQL editor, idempotent."""
    parts = [
        "-- d1sync capture migration, generated by `d1sync generate-sql` from schema.json.",
        f"-- Schema version {schema.version}, queue {queue}. Do not edit: change schema.json and regenerate.",
        "",
        queue_setup(queue),
    ]
    for table in schema.tables:
        parts += ["", f"-- {table.name} -> D1 table {table.target}", capture_function(table, queue), triggers(table)]
    return "\n".join(parts) + "\n"
