"""Restore: put D1 back to a restore point (D1 Time Travel, or the local backend's copy), then bring it in
step with Postgres again through the queue.

A restore rewinds D1 only. Changes applied after the bookmark (and deleted from the queue since) are not in
the restored database, nor are queued changes a nuke purged; so the restore is followed by a full
reconcile with repair, which re-enqueues whatever differs and applies it. It holds the consumer lock while
D1 is rewound, so no apply writes into the database half-way.

D1 keeps Time Travel history for 30 days on paid plans and 7 days on the free plan; Cloudflare limits how
often a database may be restored (docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.statements import Statement
from d1sync_dagster.engine.reconcile import ReconcileReport, reconcile
from d1sync_dagster.engine.setup import ensure_schema
from d1sync_dagster.errors import ConfigError, QueueError
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.d1_ddl import create_meta_table, upsert_meta

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    bookmark: str
    #: The restore point of the state just before the restore: restoring it undoes the restore.
    undo_bookmark: str
    reconcile: ReconcileReport = field(default_factory=ReconcileReport)


def restore(
    pg: PgmqClient,
    d1: D1Client,
    schema: Schema,
    *,
    bookmark: str,
    confirm: bool = False,
    launched_by: str = "unknown",
    source: str = "unknown",
) -> RestoreReport:
    """Rewind D1 to `bookmark`, then reconcile every table with repair. Refuses without `confirm`."""
    if not confirm:
        raise ConfigError("restore replaces the D1 database with an earlier state; confirm it (--yes)")
    if not bookmark:
        raise ConfigError("say which restore point: --bookmark B (a nuke reports the one it took)")
    with pg.consumer_lock() as got:
        if not got:
            raise QueueError("an apply is running on this queue; restore again when it has finished")
        undo = d1.restore(bookmark)
        record = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "bookmark": bookmark,
            "undo_bookmark": undo,
            "launched_by": launched_by,
            "source": source,
        }
        d1.batch([Statement(create_meta_table()), Statement(upsert_meta(), ("last_restore", json.dumps(record)))])
    log.warning("restored D1 to %s (undo with %s), launched by %s from %s", bookmark, undo, launched_by, source)
    ensure_schema(pg, d1, schema)  # the restored database may predate the current schema.json
    report = RestoreReport(bookmark=bookmark, undo_bookmark=undo)
    report.reconcile = reconcile(pg, d1, schema, repair_drift=True)
    return report
