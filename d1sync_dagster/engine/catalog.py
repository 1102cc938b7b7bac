"""What Postgres's catalog says about a replicated table's source relation (column types, key types)."""

from __future__ import annotations

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import Table
from d1sync_dagster.sql.capture import source_relation


def column_types(pg: PgmqClient, table: Table) -> dict[str, str]:
    """The Postgres type (`format_type`) of every column of the table's source relation."""
    rows = pg.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        [source_relation(table)],
    )
    return dict(rows)


def key_types(pg: PgmqClient, table: Table) -> list[str]:
    """The Postgres types of the key columns, to cast saved key text back exactly."""
    types = column_types(pg, table)
    missing = [k for k in table.key if k not in types]
    if missing:
        raise QueueError(f"{source_relation(table)} has no column(s) {', '.join(missing)} named as key in schema.json")
    return [types[k] for k in table.key]


def check_reads_every_row(pg: PgmqClient, table: Table, *, doing: str) -> None:
    """Refuse (QueueError naming the table, the role and the fix) when row level security would show this
    role only some of the table's rows: a backfill would copy, and a verify compare, a filtered view.

    Superusers and BYPASSRLS roles read every row; so does the table's owner unless the table FORCEs row
    level security; everyone else reads what the table's policies let them."""
    rows = pg.execute(
        "SELECT c.relrowsecurity, c.relforcerowsecurity, pg_has_role(c.relowner, 'USAGE'), r.rolsuper, "
        "r.rolbypassrls, current_user FROM pg_class c JOIN pg_roles r ON r.rolname = current_user "
        "WHERE c.oid = %s::regclass",
        [source_relation(table)],
    )
    if not rows:
        return
    enabled, forced, owner, superuser, bypass, role = rows[0]
    if not enabled or superuser or bypass or (owner and not forced):
        return
    raise QueueError(
        f"row level security is on for {source_relation(table)} and role {role} does not bypass it: it would "
        f"{doing} only the rows its policies show, so d1sync refuses. Connect as a role that reads every row "
        f"(ALTER ROLE {role} BYPASSRLS, as a superuser), as the table's owner"
        + (" (the table FORCEs row level security, so not even that)" if forced else "")
        + f", or give it a policy: CREATE POLICY d1sync_read ON {source_relation(table)} FOR SELECT TO {role} "
        "USING (true)"
    )
