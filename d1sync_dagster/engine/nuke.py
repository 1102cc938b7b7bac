"""Nuke: drop and recreate D1 tables from `schema.json`, optionally purging their queued changes.

Destructive, so it needs `confirm=True` (and, in Dagster, a deployment that allows it: `defs/guard.py`). It
holds the apply lock, so it never interleaves with an apply. What it did, who launched it and the restore
point are recorded in D1 (`_d1sync_meta` key `last_nuke`, shown by `d1sync status`) in the same request that
drops the tables.
After a nuke the tables are empty; run a backfill to fill them again (changes still queued, when not purged,
apply on top of the empty tables and are not enough on their own).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import databases_of
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.statements import Statement
from d1sync_dagster.engine.backfill import reset_progress
from d1sync_dagster.errors import ConfigError, D1Error, QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.d1_ddl import create_indexes, create_meta_table, create_table, drop_table, upsert_meta

log = logging.getLogger(__name__)


@dataclass
class NukeReport:
    tables: list[str]
    bookmark: str | None = None
    purged_messages: int = 0
    purged_dead_letters: int = 0
    statements: list[str] = field(default_factory=list)
    #: Restore points of the shard databases the nuke touched (sharded tables), by shard.
    shard_bookmarks: dict[str, str | None] = field(default_factory=dict)


def nuke(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    *,
    tables: list[str] | None = None,
    purge_queue: bool = False,
    confirm: bool = False,
    launched_by: str = "unknown",
    source: str = "unknown",
    accept_no_restore_point: bool = False,
) -> NukeReport:
    """Drop and recreate `tables` (None: all) in D1; with `purge_queue`, drop their queued changes and
    dead letters too. Refuses without `confirm`, and when no restore point can be taken unless
    `accept_no_restore_point`. `launched_by` and `source` say who asked, for the record."""
    if not confirm:
        raise ConfigError("nuke drops D1 tables and everything in them; confirm it (--yes, or confirm: true)")
    chosen = [schema.table(n) for n in tables] if tables else list(schema.tables)
    everything = len(chosen) == len(schema.tables)
    with pg.consumer_lock() as got:
        if not got:
            raise QueueError("an apply is running on this queue; nuke again when it has finished")
        # Every database the nuke touches: home, and the shards of the sharded tables among `chosen`.
        touched: dict[str | None, tuple[D1Client, list[Table]]] = {None: (d1, [])}
        for t in chosen:
            for name, client in databases_of(d1, t.name):
                touched.setdefault(name, (client, []))[1].append(t)
        # A restore point first, so a mistaken nuke can be undone (D1 Time Travel, or a local backup copy).
        bookmarks: dict[str | None, str | None] = {}
        for name, (client, _) in touched.items():
            bookmarks[name] = None
            try:
                bookmarks[name] = client.bookmark()
            except D1Error as e:
                if not accept_no_restore_point:
                    where = "" if name is None else f" of shard {name}"
                    raise D1Error(
                        f"no restore point{where} could be taken before the nuke ({e}); nothing was dropped. Try "
                        "again, or accept a nuke that cannot be undone (--no-restore-point, or "
                        "accept_no_restore_point: true)",
                        kind=e.kind,
                        retry_at=e.retry_at,
                    ) from None
                log.warning("no restore point could be taken (%s); nuking anyway, as accepted", e)
        bookmark = bookmarks[None]
        log.warning("D1 restore point before nuke: %s", bookmark)
        stmts: list[str] = []
        audit = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tables": [t.name for t in chosen],
            "purge_queue": purge_queue,
            "launched_by": launched_by,
            "source": source,
            "restore_point": bookmark,
        }
        if len(touched) > 1:
            audit["shard_restore_points"] = {str(n): b for n, b in bookmarks.items() if n is not None}
        for client, held in touched.values():
            mine = [create_meta_table()]
            for t in held:
                mine += [drop_table(t), create_table(t), *create_indexes(t)]
            stmts += mine
            client.batch([Statement(x) for x in mine] + [Statement(upsert_meta(), ("last_nuke", json.dumps(audit)))])
        report = NukeReport(
            tables=[t.name for t in chosen],
            bookmark=bookmark,
            statements=stmts,
            shard_bookmarks={str(n): b for n, b in bookmarks.items() if n is not None},
        )
        if purge_queue:
            names = [t.name for t in chosen]
            with pg.transaction():
                for queue, attr in ((pg.queue, "purged_messages"), (pg.dlq, "purged_dead_letters")):
                    n = pg.purge(queue) if everything else pg.delete_for_tables(names, queue=queue)
                    setattr(report, attr, n)
        reset_progress(pg, chosen)
    log.warning(
        "nuked D1 tables %s (queue purged: %s), launched by %s from %s",
        ", ".join(report.tables),
        purge_queue,
        launched_by,
        source,
    )
    return report
