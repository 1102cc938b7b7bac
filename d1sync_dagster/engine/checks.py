"""Per-table health figures behind the asset checks and `d1sync status`."""

from __future__ import annotations

from dataclasses import dataclass

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.status import dead_letters_by_table
from d1sync_dagster.schema import Schema
from d1sync_dagster.sql.capture import source_relation
from d1sync_dagster.sql.quoting import ident


@dataclass(frozen=True)
class TableHealth:
    source_rows: int
    d1_rows: int
    queued: int
    lag_seconds: float | None
    dead_letters: int


def table_health(pg: PgmqClient, d1: D1Client, schema: Schema) -> dict[str, TableHealth]:
    """Row counts on both sides, queued changes and the age of the oldest, dead letters; per table."""
    queued = {
        t: (int(n), float(age) if age is not None else None)
        for t, n, age in pg.execute(
            "SELECT message->>'table', count(*), extract(epoch FROM now() - min(enqueued_at)) "
            f"FROM pgmq.{ident('q_' + pg.queue)} GROUP BY 1"
        )
    }
    letters = dead_letters_by_table(pg)
    out = {}
    for t in schema.tables:
        source = int(pg.execute(f"SELECT count(*) FROM {source_relation(t)}")[0][0])
        (res,) = d1.query(f"SELECT count(*) AS n FROM {ident(t.target)}")
        n, age = queued.get(t.name, (0, None))
        out[t.name] = TableHealth(source, int(res.results[0]["n"]), n, age, letters.get(t.name, 0))
    return out
