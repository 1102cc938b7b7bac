"""Postgres and PGMQ over psycopg 3: read/delete/archive/send_batch/metrics and a session advisory lock.

Only what PGMQ 1.4 has is used (Supabase runs versions that old): no headers, no conditional reads, and
the `headers`/`last_read_at` columns are never named.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.types.json import Jsonb, set_json_loads

from d1sync_dagster.core.convert import loads_exact
from d1sync_dagster.errors import QueueError
from d1sync_dagster.sql.capture import DEFAULT_QUEUE
from d1sync_dagster.sql.quoting import check_queue_name, ident

#: Supabase's transaction-mode pooler; session state (advisory locks, prepared statements) does not survive.
POOLER_PORT = 6543


def redact(url: str) -> str:
    """A connection URL with its password replaced, safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database url>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return re.sub(r"password=\S+", "password=***", urlunsplit(parts))


def is_pooled(url: str) -> bool:
    """True for a connection through Supabase's transaction pooler (port 6543)."""
    try:
        return urlsplit(url).port == POOLER_PORT
    except ValueError:
        return False


@dataclass(frozen=True)
class QueueMessage:
    msg_id: int
    read_ct: int
    enqueued_at: datetime
    message: Any


@dataclass(frozen=True)
class QueueMetrics:
    queue_name: str
    queue_length: int
    newest_msg_age_sec: int | None
    oldest_msg_age_sec: int | None
    total_messages: int


class PgmqClient:
    """One connection (autocommit) to the source database, and the queue operations d1sync needs."""

    def __init__(self, url: str, *, queue: str = DEFAULT_QUEUE, connect_timeout: int = 10) -> None:
        self.queue = check_queue_name(queue)
        self.pooled = is_pooled(url)
        self._url = url
        try:
            self.conn = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=connect_timeout,
                # The transaction pooler breaks automatic prepared statements.
                prepare_threshold=None if self.pooled else 5,
            )
        except psycopg.Error as e:
            raise QueueError(f"cannot connect to Postgres at {redact(url)}: {_first_line(e)}") from None
        # JSON numbers decode without losing digits (see core.convert.loads_exact).
        set_json_loads(loads_exact, self.conn)

    def close(self) -> None:
        self.conn.close()

    def clone(self) -> PgmqClient:
        """Another connection to the same database and queue."""
        return PgmqClient(self._url, queue=self.queue)

    def __enter__(self) -> PgmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run SQL (a whole script when there are no params); return rows of the last statement."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql.encode() if params is None else sql, params)  # type: ignore[arg-type]
                return cur.fetchall() if cur.description else []
        except psycopg.Error as e:
            err = QueueError(f"Postgres error: {_first_line(e)}")
            err.sqlstate = e.sqlstate
            raise err from None

    def metrics(self, queue: str | None = None) -> QueueMetrics:
        rows = self.execute(
            "SELECT queue_name, queue_length, newest_msg_age_sec, oldest_msg_age_sec, total_messages "
            "FROM pgmq.metrics(%s)",
            [queue or self.queue],
        )
        return QueueMetrics(*rows[0])

    def read(self, *, vt: int, qty: int, queue: str | None = None) -> list[QueueMessage]:
        """Read up to `qty` visible messages, hiding them for `vt` seconds; sorted by msg_id."""
        rows = self.execute(
            "SELECT msg_id, read_ct, enqueued_at, message FROM pgmq.read(%s, %s, %s)",
            [queue or self.queue, vt, qty],
        )
        return sorted((QueueMessage(*r) for r in rows), key=lambda m: m.msg_id)

    def delete(self, ids: Sequence[int], queue: str | None = None) -> list[int]:
        if not ids:
            return []
        rows = self.execute("SELECT * FROM pgmq.delete(%s, %s::bigint[])", [queue or self.queue, list(ids)])
        return [r[0] for r in rows]

    def archive(self, ids: Sequence[int], queue: str | None = None) -> list[int]:
        if not ids:
            return []
        rows = self.execute("SELECT * FROM pgmq.archive(%s, %s::bigint[])", [queue or self.queue, list(ids)])
        return [r[0] for r in rows]

    def send_batch(self, messages: Sequence[Any], queue: str | None = None) -> list[int]:
        if not messages:
            return []
        rows = self.execute(
            "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[])",
            [queue or self.queue, [Jsonb(m) for m in messages]],
        )
        return [r[0] for r in rows]

    def make_visible(self, queue: str | None = None) -> int:
        """Make every hidden message visible again (vt = now); returns how many were hidden.

        Only for the holder of the single-consumer lock: a hidden message then belongs to a consumer that died
        mid-batch, and skipping it would apply later changes before it.
        """
        q = check_queue_name(queue or self.queue)
        rows = self.execute(f"UPDATE pgmq.{ident('q_' + q)} SET vt = now() WHERE vt > now() RETURNING msg_id")
        return len(rows)

    def dead_letter(self, items: Sequence[tuple[int, str, str | None]], *, dlq: str) -> list[int]:
        """Copy messages (by msg_id, with a reason and table) from the queue to the dead-letter queue.

        The original message is copied inside Postgres, byte for byte; nothing is re-encoded in Python.
        """
        if not items:
            return []
        ids, reasons, tables = zip(*items, strict=True)
        rows = self.execute(
            f"""SELECT pgmq.send_batch(%s, ARRAY(
                  SELECT jsonb_build_object('error', e.reason, 'table', e.tbl, 'msg_id', q.msg_id,
                                            'read_ct', q.read_ct, 'enqueued_at', q.enqueued_at,
                                            'queue', %s::text, 'message', q.message)
                  FROM pgmq.{ident("q_" + self.queue)} q
                  JOIN unnest(%s::bigint[], %s::text[], %s::text[]) AS e(id, reason, tbl) ON q.msg_id = e.id
                  ORDER BY q.msg_id))""",
            [check_queue_name(dlq), self.queue, list(ids), list(reasons), list(tables)],
        )
        return [r[0] for r in rows]

    def purge(self, queue: str | None = None) -> int:
        return int(self.execute("SELECT pgmq.purge_queue(%s)", [queue or self.queue])[0][0])

    def has_pgmq(self) -> bool:
        return bool(self.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgmq')")[0][0])

    @contextmanager
    def advisory_lock(self, name: str) -> Iterator[bool]:
        """Try a session advisory lock keyed by `name`; yields whether it was taken, releases it after.

        Through the transaction pooler a session lock protects nothing, so it refuses to pretend.
        """
        if self.pooled:
            raise QueueError(
                "the single-consumer lock needs a session connection: use Supabase's direct or session-mode "
                "connection string (port 5432), not the transaction pooler (port 6543)"
            )
        got = bool(self.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [name])[0][0])
        try:
            yield got
        finally:
            if got:
                self.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [name])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
