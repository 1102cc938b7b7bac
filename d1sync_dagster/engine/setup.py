"""Setup and schema evolution: the capture migration in Postgres, tables and indexes in D1, the applied
schema recorded in D1.

Evolution, decided against what D1 has (its columns and indexes, and the table entries recorded in
`_d1sync_meta` at the last setup):
- a new column is added in place (`ALTER TABLE ADD COLUMN`) and then backfilled, so existing rows get it;
- a removed column is dropped (`ALTER TABLE DROP COLUMN`), after the indexes that no longer belong;
- a column renamed in Postgres and then in `schema.json` is renamed in D1 (`ALTER TABLE RENAME COLUMN`) and
  keeps its data: told by its attnum, which setup records (`d1sync.source_columns`, see `core/drift.py`);
- a new index is created, an index no longer in `schema.json` dropped (names are deterministic);
- a changed column type or primary key rebuilds the table: dropped, created anew, backfilled.
Postgres is set up first, so the triggers already carry new columns when the backfill reads the table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import all_databases, databases_of
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.statements import Statement
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.drift import check, live_columns, recorded_columns
from d1sync_dagster.engine.status import d1_meta
from d1sync_dagster.errors import QueueError, SchemaError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import (
    DEFAULT_QUEUE,
    FUNCTION_SCHEMA,
    SOURCE_COLUMNS,
    dlq_name,
    function_name,
    held_name,
    migration,
    remove_capture,
    source_relation,
)
from d1sync_dagster.sql.d1_ddl import (
    META_TABLE,
    add_column,
    create_indexes,
    create_meta_table,
    create_table,
    drop_table,
    index_name,
    upsert_meta,
)
from d1sync_dagster.sql.quoting import ident, literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetupResult:
    schema_version: str
    tables: list[str]
    d1_statements: int
    added_columns: list[str] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)
    dropped_indexes: list[str] = field(default_factory=list)
    rebuilt_tables: list[str] = field(default_factory=list)
    backfilled_tables: list[str] = field(default_factory=list)
    renamed_columns: list[str] = field(default_factory=list)


@dataclass
class D1State:
    """What D1 has for the schema's tables."""

    columns: dict[str, set[str]] = field(default_factory=dict)  # by D1 table name
    indexes: dict[str, set[str]] = field(default_factory=dict)  # d1sync's idx_ indexes, by D1 table name
    specs: dict[str, dict[str, object]] = field(default_factory=dict)  # recorded entries, by source name
    schema_version: str | None = None


def d1_state(d1: D1Client, schema: Schema) -> D1State:
    """Columns, d1sync's indexes and the recorded table entries (one request)."""
    names = ", ".join(literal(t.target) for t in schema.tables)
    meta_exists = f"SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = {literal(META_TABLE)}"
    res = d1.batch(
        [
            Statement(
                "SELECT m.name AS tbl, p.name AS col FROM sqlite_master AS m, pragma_table_info(m.name) AS p "
                f"WHERE m.type = 'table' AND m.name IN ({names})"
            ),
            Statement(
                "SELECT tbl_name AS tbl, name FROM sqlite_master "
                f"WHERE type = 'index' AND name LIKE 'idx\\_%' ESCAPE '\\' AND tbl_name IN ({names})"
            ),
            Statement(meta_exists),
        ]
    )
    state = D1State()
    for r in res[0].results:
        state.columns.setdefault(r["tbl"], set()).add(r["col"])
    for r in res[1].results:
        state.indexes.setdefault(r["tbl"], set()).add(r["name"])
    if res[2].results[0]["n"]:
        (meta,) = d1.query(f"SELECT key, value FROM {ident(META_TABLE)}")
        for r in meta.results:
            if r["key"].startswith("table_spec:"):
                state.specs[r["key"].removeprefix("table_spec:")] = json.loads(r["value"])
            elif r["key"] == "schema_version":
                state.schema_version = r["value"]
    return state


#: What Postgres says when the pgmq schema holds a plain-SQL install older than 1.5.1: 1.4's SQL file makes
#: `pgmq.create` run `ALTER EXTENSION pgmq ADD TABLE`, and 1.5.0's does not install at all.
_OLD_SQL_INSTALL = ('extension "pgmq" does not exist', "function pgmq.create(unknown) does not exist")


def setup_postgres(pg: PgmqClient, schema: Schema, *, pgmq_sql: str | None = None) -> None:
    """Install the queue, the dead-letter queue, capture functions and triggers (idempotent). Where the
    database has no PGMQ and the extension cannot be created, `pgmq_sql` (the bundled plain-SQL install,
    offered by `setup --install-pgmq`) is installed instead; without it, setup stops and says so."""
    if not pg.has_pgmq():
        try:
            pg.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        except QueueError as e:
            if pgmq_sql is None:
                raise QueueError(
                    f"PGMQ is not installed in this database and the extension could not be created ({e}). On "
                    "Supabase enable the pgmq extension (Database, Extensions); elsewhere install PGMQ, or let "
                    "`d1sync setup --install-pgmq` install the PGMQ SQL bundled with d1sync"
                ) from None
            pg.execute(pgmq_sql)
            log.warning("installed PGMQ from its SQL file (no extension was available)")
    missing = [
        f"{t.spec.source_schema}.{t.name}"
        for t in schema.tables
        if pg.execute("SELECT to_regclass(%s) IS NULL", [f'"{t.spec.source_schema}"."{t.name}"'])[0][0]
    ]
    if missing:
        raise SchemaError(
            f"source table(s) {', '.join(missing)} named in schema.json do not exist in Postgres; create them "
            "or remove them from schema.json"
        )
    try:
        pg.execute(migration(schema, queue=pg.queue))
    except QueueError as e:
        if any(text in str(e) for text in _OLD_SQL_INSTALL):
            raise QueueError(
                f"setup could not create the queue: {e}. The pgmq schema here is a plain-SQL install of PGMQ "
                "older than 1.5.1 (1.4's SQL file expects the extension, 1.5.0's does not install): use the "
                "pgmq extension (Supabase ships 1.4.4 and later as one), or a plain-SQL install of 1.5.1 or later"
            ) from None
        if e.sqlstate != "42501":  # insufficient_privilege
            raise
        raise QueueError(f"setup could not install the capture side in Postgres: {e}. {_rights_hint(pg)}") from None
    _drop_legacy_capture(pg, schema)


def _drop_legacy_capture(pg: PgmqClient, schema: Schema) -> None:
    """Before each queue had capture of its own, a deployment on another queue than the default installed
    its capture under the default names (and so replaced the default deployment's). Where those triggers
    still write into this queue, they are this queue's old copy: drop them, or every change would be queued
    twice."""
    if pg.queue == DEFAULT_QUEUE:
        return
    for table in schema.tables:
        rel = source_relation(table)
        legacy = pg.capture_triggers(rel, FUNCTION_SCHEMA, function_name(table, DEFAULT_QUEUE))
        if legacy and all(ours for _, _, ours, _ in legacy):
            pg.execute(remove_capture(table, DEFAULT_QUEUE))
            log.warning(
                "dropped the capture of %s that an older d1sync installed for queue %s under the default names",
                rel,
                pg.queue,
            )


def teardown_postgres(pg: PgmqClient, schema: Schema, *, drop_queue: bool = False) -> list[str]:
    """Remove this queue's capture (triggers and functions) from the schema's tables, and with `drop_queue`
    the queue, its dead-letter and held queues and its record of the source columns. Other queues' capture on
    the same tables stays exactly as it was. Returns the tables whose capture was removed."""
    removed = []
    with pg.transaction():
        for table in schema.tables:
            if not pg.execute("SELECT to_regclass(%s) IS NULL", [source_relation(table)])[0][0]:
                pg.execute(remove_capture(table, pg.queue))
                removed.append(table.name)
        if drop_queue:
            if pg.execute("SELECT to_regclass(%s) IS NOT NULL", [SOURCE_COLUMNS])[0][0]:
                pg.execute(f"DELETE FROM {SOURCE_COLUMNS} WHERE queue = %s", [pg.queue])
            for name in (pg.queue, dlq_name(pg.queue), held_name(pg.queue)):
                if pg.execute("SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = %s)", [name])[0][0]:
                    pg.execute("SELECT pgmq.drop_queue(%s)", [name])
    return removed


def _rights_hint(pg: PgmqClient) -> str:
    """Which role lacks what for the migration, and the statements that grant it."""
    role, owner, usage, create = pg.schema_rights("pgmq")
    if owner is not None and not (usage and create):
        lacking = " and ".join(x for x, ok in (("USAGE", usage), ("CREATE", create)) if not ok)
        return (
            f"Role {role} lacks {lacking} on schema pgmq, which {owner} owns. As {owner} (Supabase: the SQL editor "
            f"runs as postgres; older projects need supabase_admin): GRANT USAGE, CREATE ON SCHEMA pgmq TO {role}; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO {role}; GRANT USAGE ON ALL "
            f"SEQUENCES IN SCHEMA pgmq TO {role}. Or run supabase_migration.sql in the SQL editor, then d1sync setup. "
            "d1sync doctor lists every right it checks."
        )
    return (
        f"Role {role} may not create the capture functions (schema d1sync) or triggers on the source tables: "
        "run setup as the tables' owner, or run supabase_migration.sql in the Supabase SQL editor. d1sync doctor "
        "lists every right it checks."
    )


def _needs_rebuild(table: Table, recorded: dict[str, object] | None) -> bool:
    """A column type or the key changed since the table was created (added/removed columns do not count)."""
    if recorded is None:
        return False
    now = table.spec.to_json()
    old_cols = recorded.get("columns") or {}
    assert isinstance(old_cols, dict)
    changed_type = any(c in old_cols and old_cols[c] != t for c, t in table.columns.items())
    return changed_type or recorded.get("primaryKey") != now["primaryKey"]


#: Per table, D1 columns to rename: old name -> new name.
Renames = dict[str, dict[str, str]]


def renamed_columns(pg: PgmqClient, schema: Schema) -> Renames:
    """Columns of `schema` that the source has under a name the last setup recorded for another column (the
    same attnum): a rename in Postgres that schema.json now follows. Read before setup records the columns
    anew."""
    live, recorded = live_columns(pg, schema), recorded_columns(pg, schema)
    out: Renames = {}
    for t in schema.tables:
        was = {c.attnum: name for name, c in recorded.get(t.name, {}).items() if name not in t.columns}
        for col in t.columns:
            now = live.get(t.name, {}).get(col)
            if col not in recorded.get(t.name, {}) and now is not None and now.attnum in was:
                out.setdefault(t.name, {})[was[now.attnum]] = col
    return out


def setup_d1(d1: D1Client, schema: Schema, *, renames: Renames | None = None) -> SetupResult:
    """Bring D1 to `schema` in one batch per database (idempotent) and record it. Returns what changed; added
    columns and rebuilt tables need a backfill (`setup` runs it). With shards, each database gets the tables
    it holds (the home database the unsharded ones, each shard the sharded tables routed to it) and the
    schema version."""
    parts: dict[str, list[Table]] = {}
    databases: dict[str, D1Client] = {}
    for name, client in all_databases(d1):
        databases[name or ""] = client
        parts[name or ""] = []
    for t in schema.tables:
        for name, _ in databases_of(d1, t.name):
            parts[name or ""].append(t)
    results = [
        _setup_database(databases[n], Schema(tables=tuple(ts)), schema.version, renames or {})
        for n, ts in parts.items()
    ]
    if len(results) == 1:
        return results[0]

    def merged(field: str) -> list[str]:
        return sorted({x for r in results for x in getattr(r, field)})

    return SetupResult(
        schema.version,
        schema.names,
        sum(r.d1_statements for r in results),
        added_columns=merged("added_columns"),
        dropped_columns=merged("dropped_columns"),
        dropped_indexes=merged("dropped_indexes"),
        rebuilt_tables=merged("rebuilt_tables"),
        renamed_columns=merged("renamed_columns"),
    )


def _renamed_spec(recorded: dict[str, object] | None, renames: dict[str, str]) -> dict[str, object] | None:
    """A recorded table entry with its renamed columns under their new names (a rename is no rebuild)."""
    if recorded is None or not renames:
        return recorded
    cols = recorded.get("columns") or {}
    assert isinstance(cols, dict)
    key = recorded.get("primaryKey")
    key = [renames.get(k, k) for k in key] if isinstance(key, list) else renames.get(str(key), key)
    return {**recorded, "columns": {renames.get(c, c): v for c, v in cols.items()}, "primaryKey": key}


def _setup_database(d1: D1Client, schema: Schema, version: str, renames: Renames) -> SetupResult:
    """`setup_d1` for one database and the tables it holds; records `version`, the whole schema's."""
    state = d1_state(d1, schema) if schema.tables else D1State()
    stmts = [create_meta_table()]
    added, dropped, dropped_idx, rebuilt, renamed = [], [], [], [], []
    for t in schema.tables:
        have = state.columns.get(t.target)
        moves = {old: new for old, new in renames.get(t.name, {}).items() if have and old in have and new not in have}
        if have is not None and _needs_rebuild(t, _renamed_spec(state.specs.get(t.name), moves)):
            stmts.append(drop_table(t))
            rebuilt.append(t.name)
            have = None
        stmts.append(create_table(t))
        if have is None:
            stmts += create_indexes(t)
            continue
        for old, new in moves.items():
            stmts.append(f"ALTER TABLE {ident(t.target)} RENAME COLUMN {ident(old)} TO {ident(new)}")
            renamed.append(f"{t.target}.{old} -> {new}")
            have = (have - {old}) | {new}
        wanted = {index_name(t, cols) for cols in t.indexes}
        for name in sorted(state.indexes.get(t.target, set()) - wanted):
            stmts.append(f"DROP INDEX IF EXISTS {ident(name)}")
            dropped_idx.append(name)
        for col, typ in t.columns.items():
            if col not in have:
                stmts.append(add_column(t, col))
                added.append(f"{t.target}.{col} {typ}")
        for col in sorted(have - set(t.columns)):
            stmts.append(f"ALTER TABLE {ident(t.target)} DROP COLUMN {ident(col)}")
            dropped.append(f"{t.target}.{col}")
        stmts += create_indexes(t)
    batch = [Statement(s) for s in stmts]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    batch += [
        Statement(upsert_meta(), ("schema_version", version)),
        Statement(upsert_meta(), ("schema_applied_at", now)),
    ]
    for t in schema.tables:
        batch.append(Statement(upsert_meta(), (f"table_version:{t.name}", t.version)))
        batch.append(Statement(upsert_meta(), (f"table_spec:{t.name}", json.dumps(t.spec.to_json(), sort_keys=True))))
    d1.batch(batch)
    for what, items in (
        ("added column", added),
        ("dropped column", dropped),
        ("rebuilt table", rebuilt),
        ("renamed column", renamed),
    ):
        for item in items:
            log.warning("%s %s in D1", what, item)
    return SetupResult(
        version,
        schema.names,
        len(batch),
        added_columns=added,
        dropped_columns=dropped,
        dropped_indexes=dropped_idx,
        rebuilt_tables=rebuilt,
        renamed_columns=renamed,
    )


def setup(
    pg: PgmqClient, d1: D1Client, schema: Schema, *, backfill_changes: bool = True, pgmq_sql: str | None = None
) -> SetupResult:
    """Both sides, Postgres first; then backfill the tables that gained columns or were rebuilt. `pgmq_sql`:
    see `setup_postgres`."""
    renames = renamed_columns(pg, schema)
    setup_postgres(pg, schema, pgmq_sql=pgmq_sql)
    result = setup_d1(d1, schema, renames=renames)
    for found in check(pg, schema).values():
        for d in found:
            log.warning("schema drift remains after setup: %s", d.describe())
    need = sorted({c.split(".")[0] for c in result.added_columns} | set(result.rebuilt_tables))
    names = [t.name for t in schema.tables if t.target in need or t.name in need]
    if backfill_changes and names:
        backfill(pg, d1, schema, tables=names, restart=True)
        result = SetupResult(**{**result.__dict__, "backfilled_tables": names})
    log.info("setup done: %d tables, schema version %s", len(schema.tables), schema.version)
    return result


def ensure_schema(pg: PgmqClient, d1: D1Client, schema: Schema) -> SetupResult | None:
    """Run `setup` when D1 does not have this schema version yet (before an apply); None when it has."""
    applied = d1_meta(d1).get("schema_version")  # a temporary D1 failure is raised, not taken for "no table"
    if applied == schema.version:
        return None
    log.warning("schema.json changed since the last setup: updating D1 before applying")
    return setup(pg, d1, schema)
