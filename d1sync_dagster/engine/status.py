"""Status: queue depth and age, dead letters per table, what D1 last applied."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import all_databases
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.costs import daily_reads
from d1sync_dagster.errors import D1Error
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.d1_ddl import META_TABLE
from d1sync_dagster.sql.quoting import ident


@dataclass
class Status:
    queue: str
    queue_depth: int
    oldest_message_age_seconds: int | None
    newest_msg_id: int
    dead_letters: dict[str, int] = field(default_factory=dict)
    last_applied_at: str | None = None
    last_applied_msg_id: int | None = None
    schema_version_applied: str | None = None
    schema_version_current: str = ""
    pgmq: str = ""
    #: The last nuke recorded in D1: when, which tables, who launched it, from where, its restore point.
    last_nuke: dict[str, Any] | None = None
    #: The last restore recorded in D1 (a restore rewinds the records too, so a nuke it undid is not shown).
    last_restore: dict[str, Any] | None = None

    #: Changes waiting in the held queue per table, while (or since) its source drifted from schema.json.
    held: dict[str, int] = field(default_factory=dict)

    #: The read-your-writes position D1 recorded last (a Postgres snapshot, `core/txns.py`), and when.
    position: str | None = None
    position_at: str | None = None

    #: Per shard database: its schema version and what it last applied (a target with shards only).
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    #: d1sync's own D1 rows read a day at steady state (`engine/costs.py`): reconcile, checks at most.
    d1_rows_read_per_day: dict[str, int] = field(default_factory=dict)
    d1_reads: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.shards:
            out.pop("shards")
        return out


def d1_meta(d1: D1Client) -> dict[str, str]:
    """d1sync's key/value records in D1 (empty before setup). Only D1 saying the table does not exist means
    "before setup": any other failure (a temporary error, a lockout, a bad token) is raised, so that it is
    never taken for a database that needs setting up."""
    try:
        (res,) = d1.query(f"SELECT key, value FROM {ident(META_TABLE)}")
    except D1Error as e:
        if e.kind == "sql" and "no such table" in str(e).lower():
            return {}
        raise
    return {r["key"]: r["value"] for r in res.results}


def status(pg: PgmqClient, d1: D1Client, schema: Schema) -> Status:
    m = pg.metrics()
    metas = {name: d1_meta(client) for name, client in all_databases(d1)}
    meta = dict(metas.pop(None))
    for other in metas.values():  # a batch records what it applied in every database it wrote
        for key in ("last_applied_at", "last_applied_msg_id"):
            if key in other and (key not in meta or _later(other[key], meta[key])):
                meta[key] = other[key]
    letters = pg.dead_letters_by_table()
    reads = daily_reads(pg, schema)
    return Status(
        d1_rows_read_per_day={"reconcile": reads.reconcile, "checks_at_most": reads.checks_at_most},
        d1_reads=reads.describe(),
        queue=pg.queue,
        pgmq=pg.pgmq_install(),
        queue_depth=m.queue_length,
        oldest_message_age_seconds=m.oldest_msg_age_sec,
        newest_msg_id=m.total_messages,
        held=pg.held_by_table(),
        dead_letters={t.name: letters.get(t.name, 0) for t in schema.tables}
        | {k: v for k, v in letters.items() if k not in schema.names},
        last_applied_at=meta.get("last_applied_at"),
        position=meta.get("position"),
        position_at=meta.get("position_at"),
        last_applied_msg_id=int(meta["last_applied_msg_id"]) if "last_applied_msg_id" in meta else None,
        schema_version_applied=meta.get("schema_version"),
        schema_version_current=schema.version,
        last_nuke=json.loads(meta["last_nuke"]) if "last_nuke" in meta else None,
        last_restore=json.loads(meta["last_restore"]) if "last_restore" in meta else None,
        shards={
            str(name): {
                "schema_version_applied": x.get("schema_version"),
                "last_applied_at": x.get("last_applied_at"),
                "last_applied_msg_id": int(x["last_applied_msg_id"]) if "last_applied_msg_id" in x else None,
                "position": x.get("position"),
                "position_at": x.get("position_at"),
            }
            for name, x in metas.items()
        },
    )


def _later(a: str, b: str) -> bool:
    """Whether record `a` is later than `b` (msg ids as numbers, ISO times as text)."""
    return int(a) > int(b) if a.isdigit() and b.isdigit() else a > b
