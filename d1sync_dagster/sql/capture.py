"""The Postgres side: queue, capture trigger functions and triggers, generated from the schema.

Design:
- Statement-level triggers with transition tables: a bulk write pays one queue write per statement instead
  of one `pgmq.send` per row. By default that write is one `INSERT ... SELECT` into the queue table
  `pgmq.q_<queue>` filling exactly the columns `pgmq.send_batch` fills (`vt`, `message`; `msg_id` and
  `enqueued_at` from their defaults), which benchmarks/trigger_overhead.py measured well ahead of building
  an array for `pgmq.send_batch` (which unnests it into the same INSERT). `via="send_batch"` generates the
  API call instead, for installs that forbid writing the queue table.
- Messages keep the seed's shape `{"record", "old_record", "type", "table"}`, plus `"xid"`, the source
  transaction's id (`pg_current_xact_id()`, as a number); `record`/`old_record` carry only the replicated
  columns (the queue never holds columns the replica does not need).
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
import re
from collections.abc import Callable
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


def held_name(queue: str) -> str:
    """The queue where a table's changes wait while its source drifted from schema.json (`engine/drift.py`)."""
    return f"{queue}_held"


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


def _message(table: Table, record: str, old_record: str, op: str) -> str:
    """The seed's message shape, plus `xid`: the source transaction (`txid_current()`, the 64-bit
    `pg_current_xact_id()`, taken once per statement into `xid`), so the consumer publishes each transaction
    whole (`core/txns.py`)."""
    return (
        f"pg_catalog.jsonb_build_object('record', {record}, 'old_record', {old_record}, "
        f"'type', '{op}', 'table', {literal(table.name)}, 'xid', xid)"
    )


def _named_columns(table: Table, rows: str) -> str:
    """`rows` (a transition table) projected on the replicated columns by name: `(SELECT n."id", ... FROM
    new_rows n)`. Qualified, so that a column named like one of the function's variables is the column."""
    return f"(SELECT {', '.join(f'n.{ident(c)}' for c in table.columns)} FROM {rows} n)"


def _row_message(table: Table, op: str, rows: str, *, named: bool = False) -> str:
    """The same message for each row of `rows` (an INSERT's new rows or a DELETE's old ones), built by one
    `to_jsonb` of a composite whose `record` (or `old_record`) is the row itself: the row turns into JSON
    once, straight inside the message, where `jsonb_build_object` over a `to_jsonb(r)` builds the row's
    JSON and then copies it (and `jsonb_build_object` of the row itself costs more per call).

    `named`: the row is the replicated columns, named (one pass, whatever the table leaves out). Otherwise
    the row is the whole row, and the install fills in how the columns that are not replicated leave (see
    `capture_function`)."""
    key = "record" if op == "INSERT" else "old_record"
    fields = {"record": "NULL::jsonb", "old_record": "NULL::jsonb", key: "COALESCE(r.*)" if named else _RECORD}
    source = f"{_named_columns(table, rows)} r" if named else f"{rows} r"
    less = "" if named else _LESS_IN_MESSAGE.format(key)
    return (
        f"SELECT pg_catalog.to_jsonb(c){less} AS m FROM (SELECT {fields['record']} "
        f"AS record, {fields['old_record']} AS old_record, '{op}'::text AS type, {literal(table.name)}::text "
        f'AS "table", xid AS xid FROM {source}) c'
    )


def notify_channel(queue: str) -> str:
    """The channel the capture triggers notify once per statement that queued changes, and the streaming
    apply listens on (Postgres delivers it at commit, once per transaction however many statements)."""
    return f"d1sync_{check_queue_name(queue)}"


def _enqueue(queue: str, select: str, via: SendVia) -> str:
    # An assignment, not PERFORM: PL/pgSQL evaluates it as a simple expression, without starting the executor
    # (PERFORM runs a query: 7,000 instructions more per statement, 5% of a single-row INSERT's capture).
    notify = f"notified := pg_catalog.pg_notify({literal(notify_channel(queue))}, '')::text;"
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


#: Where the install puts ` - '<the columns that are not replicated>'::text[]` (see `capture_function`), or
#: nothing when every column of the table is replicated (a plain `to_jsonb`: no per-row subtraction).
_LESS_OTHER_COLUMNS = "/*@d1sync_less_other_columns@*/"
#: Where the install puts an INSERT's or DELETE's record: the row itself, or `(to_jsonb(r.*) - '<the
#: others>'::text[])` where two or more columns are not replicated. The row is `COALESCE(r.*)`, not `r`: a
#: bare `r` means the table's column of that name where it has one, and a bare `r.*` is its columns.
_RECORD = "/*@d1sync_record@*/"
#: Where the install puts ` #- '{record,<the one column not replicated>}'` (or `old_record`) when exactly one
#: is not: taking it out of the finished message is one pass over it, where the subtraction above is two.
_LESS_IN_MESSAGE = "/*@d1sync_less_{}@*/"


#: Where the install puts the condition under which an UPDATE takes the replicated columns by name: `false`
#: where a column of schema.json is missing, else a call of `columns_in_place` (see `capture_function`).
_NAMED = "/*@d1sync_named@*/"
#: The same for an INSERT or a DELETE, and `false` also where every column is replicated: the whole row is
#: then one pass already, and cheaper to start per statement than a row of named columns (its type is the
#: table's, where a row of named columns is a record type looked up for each statement).
_NAMED_ROWS = "/*@d1sync_named_rows@*/"


#: The function that tells the capture functions whether they may take the columns by name.
COLUMNS_IN_PLACE = f"{ident(FUNCTION_SCHEMA)}.columns_in_place(text, oid, text[])"


def named_form_table(body: str) -> int | None:
    """The oid of the table a capture function's named form checks (see `capture_function`), from its body;
    None where the function has no named form (a column of schema.json was missing at install)."""
    found = re.search(r"columns_in_place\(.*?, (\d+)::pg_catalog\.oid, ", body)
    return int(found.group(1)) if found else None


def _update(table: Table, rows: Callable[[str], str], *, named: bool) -> str:
    """An UPDATE statement's messages. `rows` (of a transition table) gives each row's key columns as text
    (`k0`, ...) and its record `r`: the named replicated columns as a row (`named`), else the row's JSON less
    the columns that are not replicated. Old and new rows pair by key in one full join; a pair whose records
    are the same sends nothing. Each message is one `to_jsonb` of a composite, as for an INSERT.

    - The keys compare as text in the "C" collation: cheap to hash and sort, and equal only where the values'
      text is, so a key that changed in a way the type's own equality ignores (`citext` 'A' to 'a') is a
      DELETE of the old key and an UPDATE of the new one, as D1 (which compares bytes) needs. The DELETEs go
      first: a key whose text changed yet which D1 stores as the same value (numeric 1.0 to 1.00) is deleted,
      then written.
    - Named rows compare by their binary image (`*<>`: no equality operator needed, which `json` or `point`
      lack, and no JSON built for a row that did not change; an image that differs for an equal value, numeric
      1.0 against 1.00, sends an UPDATE that changes nothing). JSON rows compare as JSON; OFFSET 0 keeps each
      row's JSON computed once."""
    join = " AND ".join(f"n.k{i} = o.k{i}" for i in range(len(table.key)))
    changed = (
        "o.k0 IS NULL OR n.k0 IS NULL OR o.r OPERATOR(pg_catalog.*<>) n.r" if named else "o.r IS DISTINCT FROM n.r"
    )
    offset = "" if named else " OFFSET 0"
    return f"""SELECT m FROM (
        SELECT n.k0 IS NOT NULL AS ord, pg_catalog.to_jsonb(c) AS m
          FROM ({rows("old_rows")}{offset}) o FULL JOIN ({rows("new_rows")}{offset}) n ON {join}
          CROSS JOIN LATERAL (SELECT n.r AS record, o.r AS old_record,
            CASE WHEN n.k0 IS NULL THEN 'DELETE' ELSE 'UPDATE' END::text AS type,
            {literal(table.name)}::text AS "table", xid AS xid) c
         WHERE {changed}
      ) c ORDER BY ord"""


def capture_function(table: Table, queue: str, *, via: SendVia = "insert") -> str:
    """A `DO` block that creates (or replaces) the table's capture trigger function of `queue`.

    No DDL on the table may make capture fail inside the application's transaction, and PL/pgSQL bodies are
    not dependencies: a column the function named could be dropped or renamed, and every later write would
    fail the next time the statement is planned. So each statement comes in two forms:
    - **By name**, while every replicated column is in place: the replicated columns, named, go into the
      message in one pass, whatever the table keeps out of D1; an UPDATE compares old and new rows before any
      JSON is built (see `_update`). INSERTs and DELETEs of a table that replicates every column keep the
      name-free form, one pass too and cheaper per statement (`_NAMED_ROWS`). The form by name runs only
      while `d1sync.columns_in_place` says every replicated column is still there under its name. That
      function is IMMUTABLE on purpose: the planner calls it once and keeps its answer in the condition's
      plan, which holds a `regclass` constant of the table (`num_nonnulls(TG_RELID, '<oid>'::regclass)`,
      always true), so any DDL on the table invalidates the plan and the next statement asks again. The query
      naming the columns is planned only when it runs, so a dropped or renamed column never reaches it. A
      column added since the install does not travel there (apply would ignore it; `doctor` names it).
    - **Name-free**, otherwise (a replicated column dropped or renamed, the table renamed, or a dump restored
      under another oid): a row's record is the whole row less the columns that are not replicated, a list the
      block reads from the catalog when it runs. Where every column is replicated, the row goes into the
      message as it is (one pass); where one is not, it is taken out of the finished message
      (`#- '{record,col}'`); where more are not, the record is the row's `to_jsonb` less them (`- text[]`).
      This form keeps working through any DDL:
      - a replicated column dropped or renamed is missing from the record (a renamed one's values travel under
        its new name, so the change replays once schema.json follows); the consumer sees the missing column
        and holds the table's changes (`engine/drift.py`) instead of writing NULL for it;
      - a retyped column travels in its new type; the consumer holds the table when its values no longer
        convert;
      - a column added since the install travels too, ignored by the consumer, until `d1sync setup` runs
        again (`doctor` names it).
    Both forms give the same messages for the same changes (tests/sql/test_capture.py runs every kind through
    each; benchmarks/capture_instructions.py counts their cost), but for an UPDATE to an equal value of
    another binary image (numeric 1.0 to 1.00), which the named form sends and the other does not. UPDATE
    rows are paired by their keys' text (see `_update`). Every column is qualified (`n."id"`), and the
    function's own variables win over a column of the same name (`#variable_conflict use_variable`): a source
    table may well have a column `xid`, and an ambiguous name would fail every write."""
    check_queue_name(queue)
    fn = f"{ident(FUNCTION_SCHEMA)}.{ident(function_name(table, queue))}"

    def either(by_name: str, whole: str, condition: str = _NAMED_ROWS) -> str:
        return (
            f"IF {condition} THEN\n    {_enqueue(queue, by_name, via)}\n    ELSE\n"
            f"    {_enqueue(queue, whole, via)}\n    END IF;"
        )

    insert = either(_row_message(table, "INSERT", "new_rows", named=True), _row_message(table, "INSERT", "new_rows"))
    delete = either(_row_message(table, "DELETE", "old_rows", named=True), _row_message(table, "DELETE", "old_rows"))
    collate = 'COLLATE pg_catalog."C"'
    # Each row's JSON once (OFFSET 0: not flattened, or each use of `j` would compute it again).
    whole_keys = ", ".join(f"x.j->>{literal(k)} {collate} AS k{i}" for i, k in enumerate(table.key))

    def whole_rows(rel: str) -> str:
        return (
            f"SELECT {whole_keys}, x.j{_LESS_OTHER_COLUMNS} AS r "
            f"FROM (SELECT pg_catalog.to_jsonb(t.*) AS j FROM {rel} t OFFSET 0) x"
        )

    named_keys = ", ".join(f"t.{ident(k)}::text {collate} AS k{i}" for i, k in enumerate(table.key))

    def named_rows(rel: str) -> str:
        return f"SELECT {named_keys}, COALESCE(t.*) AS r FROM {_named_columns(table, rel)} t"

    update = either(_update(table, named_rows, named=True), _update(table, whole_rows, named=False), _NAMED)
    truncate = _enqueue(queue, f"SELECT {_message(table, 'NULL', 'NULL', 'TRUNCATE')} AS m", via)
    body = f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $fn$
#variable_conflict use_variable
DECLARE
  msgs jsonb[];
  notified text;
  xid jsonb := pg_catalog.to_jsonb(pg_catalog.txid_current());
BEGIN
  IF TG_OP = 'INSERT' THEN
    {insert}
  ELSIF TG_OP = 'DELETE' THEN
    {delete}
  ELSIF TG_OP = 'UPDATE' THEN
    {update}
  ELSIF TG_OP = 'TRUNCATE' THEN
    {truncate}
  END IF;
  RETURN NULL;
END
$fn$;"""
    rel = literal(source_relation(table))
    replicated = "ARRAY[" + ", ".join(literal(c) for c in table.columns) + "]::name[]"
    return f"""DO $install$
DECLARE
  other text[];
  present int;
  less text;
  one boolean;
  named text;
BEGIN
  -- The columns that are not replicated, as the table has them now (each record leaves them out), and how
  -- many of the replicated ones it has.
  SELECT coalesce(pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
           FILTER (WHERE a.attname <> ALL ({replicated})), '{{}}'),
         pg_catalog.count(*) FILTER (WHERE a.attname = ANY ({replicated}))
    INTO other, present
    FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped;
  less := CASE WHEN pg_catalog.cardinality(other) = 0 THEN ''
    ELSE ' OPERATOR(pg_catalog.-) ' || pg_catalog.quote_literal(other::text) || '::text[]' END;
  one := pg_catalog.cardinality(other) = 1;
  -- By name where every replicated column is there (else drift: the name-free form, which names none).
  named := CASE WHEN present < pg_catalog.cardinality({replicated}) THEN 'false'
    ELSE pg_catalog.format('{ident(FUNCTION_SCHEMA)}.columns_in_place(%L, %s::pg_catalog.oid, %L::text[]) AND '
      'pg_catalog.num_nonnulls(TG_RELID, %L::pg_catalog.regclass) = 2', {rel}, {rel}::regclass::oid,
      {replicated}::text, {rel}::regclass::oid::text) END;
  EXECUTE pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
    pg_catalog.replace($body${body}$body$,
    {literal(_NAMED)}, named),
    {literal(_NAMED_ROWS)}, CASE WHEN pg_catalog.cardinality(other) = 0 THEN 'false' ELSE named END),
    {literal(_LESS_OTHER_COLUMNS)}, less),
    {literal(_RECORD)}, CASE WHEN less = '' OR one THEN 'COALESCE(r.*)'
      ELSE '(pg_catalog.to_jsonb(r.*)' || less || ')' END),
    {literal(_LESS_IN_MESSAGE.format("record"))}, CASE WHEN one THEN ' OPERATOR(pg_catalog.#-) '
      || pg_catalog.quote_literal(ARRAY['record', other[1]]::text) || '::text[]' ELSE '' END),
    {literal(_LESS_IN_MESSAGE.format("old_record"))}, CASE WHEN one THEN ' OPERATOR(pg_catalog.#-) '
      || pg_catalog.quote_literal(ARRAY['old_record', other[1]]::text) || '::text[]' ELSE '' END);
END
$install$;"""


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
    held = literal(check_queue_name(held_name(queue)))
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
  -- Where a table's changes wait while its source drifted from schema.json.
  IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = {held}) THEN
    PERFORM pgmq.create({held});
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
);

{source_columns_setup()}"""


SOURCE_COLUMNS = f"{ident(FUNCTION_SCHEMA)}.source_columns"
WATCH_TRIGGER = "d1sync_watch_ddl"


def source_columns_setup() -> str:
    """The record of each replicated column as setup found it (its attnum survives a rename, so drift tells a
    renamed column from a dropped one), and the event trigger that names drift when the DDL runs."""
    return f"""-- Each replicated column as the last setup found it in the source (drift is told against it).
CREATE TABLE IF NOT EXISTS {SOURCE_COLUMNS} (
  queue text NOT NULL,
  table_schema text NOT NULL,
  table_name text NOT NULL,
  column_name text NOT NULL,
  attnum smallint NOT NULL,
  pg_type text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (queue, table_schema, table_name, column_name)
);

-- Whether every column in `columns` is still a column of `rel`, and `rel` still the table `relid`. The capture
-- functions ask it before they take a table's replicated columns by name. It reads the catalog, yet it is
-- IMMUTABLE on purpose: the planner answers it once per plan, and any DDL on the table replans (see
-- capture_function in d1sync_dagster/sql/capture.py). It looks the columns up as the planner does (the
-- catalog caches, up to date), not with a query on pg_attribute: a REPEATABLE READ transaction reads the
-- catalog as of its snapshot, and would find a column dropped since.
CREATE OR REPLACE FUNCTION {ident(FUNCTION_SCHEMA)}.columns_in_place(rel text, relid oid, columns text[])
RETURNS boolean LANGUAGE plpgsql IMMUTABLE SET search_path = '' AS $fn$
DECLARE
  col text;
BEGIN
  IF pg_catalog.to_regclass(rel) IS DISTINCT FROM relid THEN
    RETURN false;
  END IF;
  FOREACH col IN ARRAY columns LOOP
    -- NULL for a table that is gone; an error for a column that is.
    IF pg_catalog.has_column_privilege(relid, col, 'SELECT') IS NULL THEN
      RETURN false;
    END IF;
  END LOOP;
  RETURN true;
EXCEPTION WHEN undefined_column THEN
  RETURN false;
END
$fn$;

-- Names drift in the session that runs the DDL (a WARNING) and wakes the streaming apply. It never fails
-- the DDL. Supabase lets its postgres role create event triggers (supautils), which then skip DDL run by
-- superusers; where no event trigger may be created, drift is found at apply time and by d1sync doctor.
CREATE OR REPLACE FUNCTION {ident(FUNCTION_SCHEMA)}.watch_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $fn$
DECLARE
  d record;
BEGIN
  FOR d IN
    SELECT s.queue, s.table_schema, s.table_name, s.column_name, s.pg_type, a.attname AS now_name,
           pg_catalog.format_type(a.atttypid, a.atttypmod) AS now_type
      FROM (SELECT DISTINCT e.objid FROM pg_catalog.pg_event_trigger_ddl_commands() e
             WHERE e.object_type IN ('table', 'table column')) c
      JOIN pg_catalog.pg_class k ON k.oid = c.objid
      JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
      JOIN {SOURCE_COLUMNS} s ON s.table_schema = n.nspname AND s.table_name = k.relname
      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = k.oid AND a.attnum = s.attnum AND NOT a.attisdropped
     WHERE a.attname IS DISTINCT FROM s.column_name::name
        OR pg_catalog.format_type(a.atttypid, a.atttypmod) IS DISTINCT FROM s.pg_type
  LOOP
    RAISE WARNING '%', pg_catalog.format(
      'd1sync: column %I of %I.%I is replicated to D1 (queue %s) and was %s. Until schema.json follows, its '
      'changes are held where they cannot apply. Fix: %s in schema.json, then run d1sync setup.',
      d.column_name, d.table_schema, d.table_name, d.queue,
      CASE WHEN d.now_name IS NULL THEN 'dropped'
           WHEN d.now_name <> d.column_name::name THEN pg_catalog.format('renamed to %I', d.now_name)
           ELSE pg_catalog.format('changed from %s to %s', d.pg_type, d.now_type) END,
      CASE WHEN d.now_name IS NULL THEN pg_catalog.format('remove %I from %I', d.column_name, d.table_name)
           WHEN d.now_name <> d.column_name::name
             THEN pg_catalog.format('rename %I to %I in %I', d.column_name, d.now_name, d.table_name)
           ELSE pg_catalog.format('check the type of %I in %I (d1sync doctor says which D1 type fits)',
                                  d.column_name, d.table_name) END);
    PERFORM pg_catalog.pg_notify('d1sync_' || d.queue, 'ddl');
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'd1sync could not compare this DDL with schema.json: %', SQLERRM;
END
$fn$;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = {literal(WATCH_TRIGGER)}) THEN
    CREATE EVENT TRIGGER {ident(WATCH_TRIGGER)} ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
      EXECUTE FUNCTION {ident(FUNCTION_SCHEMA)}.watch_ddl();
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'd1sync: this role may not create event triggers; drift is found at apply time and by d1sync doctor';
END
$$;"""


def record_columns(table: Table, queue: str) -> str:
    """Record the table's replicated columns as the source has them now. A column of schema.json that the
    source no longer has keeps its last record, so that drift can still tell where it went."""
    q, sch, name = literal(check_queue_name(queue)), literal(table.spec.source_schema), literal(table.name)
    cols = "ARRAY[" + ", ".join(literal(c) for c in table.columns) + "]::text[]"
    return f"""DELETE FROM {SOURCE_COLUMNS}
 WHERE queue = {q} AND table_schema = {sch} AND table_name = {name} AND column_name <> ALL ({cols});
INSERT INTO {SOURCE_COLUMNS} (queue, table_schema, table_name, column_name, attnum, pg_type)
SELECT {q}, {sch}, {name}, a.attname, a.attnum, pg_catalog.format_type(a.atttypid, a.atttypmod)
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = {literal(source_relation(table))}::regclass AND a.attnum > 0 AND NOT a.attisdropped
   AND a.attname::text = ANY ({cols})
ON CONFLICT (queue, table_schema, table_name, column_name)
DO UPDATE SET attnum = excluded.attnum, pg_type = excluded.pg_type, recorded_at = now();"""


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
            record_columns(table, queue),
        ]
    return "\n".join(parts) + "\n"


def remove_capture(table: Table, queue: str) -> str:
    """Drop `queue`'s capture triggers and function on the table (another queue's stay as they are)."""
    rel = source_relation(table)
    out = [f"DROP TRIGGER IF EXISTS {ident(name)} ON {rel};" for name in trigger_names(queue).values()]
    out.append(f"DROP FUNCTION IF EXISTS {ident(FUNCTION_SCHEMA)}.{ident(function_name(table, queue))}();")
    return "\n".join(out)
