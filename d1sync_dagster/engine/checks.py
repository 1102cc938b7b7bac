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
    queued_rows: int = 0  # row changes in the queued messages (a BACKFILL chunk carries many)
    truncate_queued: bool = False

    @property
    def count_explained(self) -> bool:
        """Whether the row counts agree once the queued changes are applied, as far as counts can tell: equal,
        or apart by no more than the queued row changes (or a queued TRUNCATE) can account for. Exact when the
        queue holds nothing for the table."""
        gap = abs(self.source_rows - self.d1_rows)
        return gap == 0 or self.truncate_queued or gap <= self.queued_rows


def table_health(pg: PgmqClient, d1: D1Client, schema: Schema) -> dict[str, TableHealth]:
    """Row counts on both sides, queued changes and the age of the oldest, dead letters; per table.

    The source counts and the queue are read in one snapshot, so every source change not yet in D1 is among
    the queued messages counted (the capture trigger enqueues in the writer's transaction)."""
    with pg.conn.transaction():
        pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        queued = {
            t: (int(n), int(rows), bool(truncate), float(age) if age is not None else None)
            for t, n, rows, truncate, age in pg.execute(
                "SELECT message->>'table', count(*), "
                "sum(CASE WHEN message->>'type' = 'BACKFILL' THEN coalesce(jsonb_array_length(message->'rows'), "
                "jsonb_array_length(message->'records'), 0) ELSE 1 END), "
                "bool_or(message->>'type' = 'TRUNCATE'), extract(epoch FROM now() - min(enqueued_at)) "
                f"FROM pgmq.{ident('q_' + pg.queue)} GROUP BY 1"
            )
        }
        sources = {t.name: int(pg.execute(f"SELECT count(*) FROM {source_relation(t)}")[0][0]) for t in schema.tables}
    letters = dead_letters_by_table(pg)
    out = {}
    for t in schema.tables:
        (res,) = d1.query(f"SELECT count(*) AS n FROM {ident(t.target)}")
        n, rows, truncate, age = queued.get(t.name, (0, 0, False, None))
        out[t.name] = TableHealth(
            sources[t.name], int(res.results[0]["n"]), n, age, letters.get(t.name, 0), rows, truncate
        )
    return out
