"""Queue-table upkeep after an apply: vacuum when dead rows pile up faster than autovacuum clears them."""

from __future__ import annotations

import logging
import time

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.errors import QueueError

log = logging.getLogger(__name__)

_vacuum_warned: set[str] = set()


def vacuum_queue(pg: PgmqClient, min_dead_rows: int) -> bool:
    """VACUUM the queue table when it holds at least `min_dead_rows` dead rows; True when it ran.

    Every message is inserted, updated by `pgmq.read` and deleted: three row versions for one change. At
    1,000 changes/s autovacuum (which visits a table at most once a minute by default) let the queue table
    grow without bound in the soak benchmark. A plain VACUUM takes no lock writers wait for. Only the
    table's owner may vacuum it (the role that ran the migration); any other role is told once, and the
    table is left to autovacuum."""
    table = f"the queue table of {pg.queue}"
    try:
        found = pg.queue_table_dead_rows()
        if found is None or found[1] < min_dead_rows:
            return False
        table, dead, owner, role = found
        if not owner:
            _warn_once(
                f"{table} as {role}",
                f"{table} has {dead} dead rows; only its owner can vacuum it (not {role}), so autovacuum has to",
            )
            return False
        started = time.monotonic()
        pg.vacuum_queue_table()
    except QueueError as e:
        _warn_once(table, f"could not vacuum the queue table {table} (autovacuum will): {e}")
        return False
    log.info("vacuumed %s (%d dead rows) in %.2f s", table, dead, time.monotonic() - started)
    return True


def _warn_once(what: str, message: str) -> None:
    """Vacuum trouble is logged once per queue table, role and process, not after every apply run."""
    if what not in _vacuum_warned:
        _vacuum_warned.add(what)
        log.warning("%s", message)
