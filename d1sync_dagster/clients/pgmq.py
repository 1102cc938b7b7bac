"""Postgres and PGMQ over psycopg 3: the one module that speaks to a queue.

PGMQ's functions (read/delete/archive/send_batch/purge_queue/metrics), the few statements d1sync runs
against the queue tables `pgmq.q_<queue>` itself (enqueue inside the caller's transaction, make messages
visible again, count what is queued per table, vacuum), the dead-letter queue and the single-consumer lock.
Nothing outside `clients/` and `sql/` names a queue table.

Only what PGMQ 1.4 has is used (Supabase runs versions that old): no headers, no conditional reads, and
the `headers`/`last_read_at` columns are never named.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import psycopg
from psycopg.types.json import Jsonb, set_json_loads

from d1sync_dagster.core.messages import ROW_CHANGES_SQL
from d1sync_dagster.errors import ConfigError, QueueError
from d1sync_dagster.exactjson import loads_exact
from d1sync_dagster.sql.capture import DEFAULT_QUEUE, dlq_name, held_name, notify_channel
from d1sync_dagster.sql.quoting import check_queue_name, ident, literal

#: Supabase's transaction-mode pooler. Session state does not survive it; d1sync keeps none (see `consumer_lock`).
POOLER_PORT = 6543


def lock_name(queue: str) -> str:
    """The advisory lock that keeps one consumer per queue (apply, nuke and the health checks take it)."""
    return f"d1sync:apply:{queue}"


def standby_lock_name(queue: str) -> str:
    """The advisory lock a streaming run holds while it stands by for the consumer lock: the sensor's proof
    that the standby is alive."""
    return f"d1sync:standby:{queue}"


def _password(url: str) -> str | None:
    """The password as typed in a URL (between the user's ':' and the last '@', so a password holding an
    unencoded '@' is whole) or a `password=` keyword; None when there is none."""
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:(.*)@[^@]*$", url)
    if m:
        return m.group(1)
    m = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url)
    return m.group(1).strip("'") if m else None


def scrub(text: str, url: str) -> str:
    """`text` (an error from libpq, which may echo the URL or, when a password holds an unencoded '@',
    take part of it for the host name) with every piece of the URL's password of 3 or more characters
    replaced by ***."""
    secret = _password(url)
    if not secret:
        return text
    for size in range(len(secret), 2, -1):
        for start in range(len(secret) - size + 1):
            piece = secret[start : start + size]
            if piece in text:
                text = text.replace(piece, "***")
    return text


def redact(url: str) -> str:
    """A connection URL with its password replaced, safe for logs and errors."""
    secret = _password(url)
    if secret and "://" in url:
        head, _, host = url.rpartition("@")
        return head[: len(head) - len(secret)] + "***@" + host
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", url)


def _connect_hint(url: str) -> str:
    """What to fix, for the mistakes that make libpq's own message unhelpful."""
    if "://" in url and not re.match(r"^postgres(ql)?://", url):
        return " (the URL must start with postgresql:// or postgres://)"
    secret = _password(url) or ""
    if re.search(r"[@:/?#]", secret):
        return " (the password holds @, :, /, ? or #: percent-encode it in the URL, @ as %40)"
    return ""


def is_pooled(url: str) -> bool:
    """True for a connection through Supabase's transaction pooler (port 6543)."""
    try:
        return urlsplit(url).port == POOLER_PORT
    except ValueError:
        return False


class QueueMessage(NamedTuple):
    """A queue row (a NamedTuple: a batch makes thousands, and a tuple is the cheapest to make)."""

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
        self._lock_holder: PgmqClient | None = None
        self._idle_holder: PgmqClient | None = None  # the lock's connection, kept between consumer_lock calls
        #: Said in the lock's application name (`run <id>` for a Dagster run): who holds it, for the sensor.
        self.holder_label: str | None = None
        if "://" in url and not re.match(r"^postgres(ql)?://", url):
            raise ConfigError(f"cannot connect to Postgres at {redact(url)}: the URL must start with postgresql://")
        try:
            self.conn = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=connect_timeout,
                # No automatic prepared statements: behind a transaction pooler (pgbouncer 1.18, Supavisor, on
                # any port) a statement prepared on one server connection is run on another, or clashes with
                # another client's of the same name. A pooler cannot be told from Postgres reliably.
                prepare_threshold=None,
            )
        except psycopg.Error as e:
            reason = scrub(_first_line(e), url)
            raise QueueError(f"cannot connect to Postgres at {redact(url)}: {reason}{_connect_hint(url)}") from None
        # JSON numbers decode without losing digits (see exactjson.loads_exact).
        set_json_loads(loads_exact, self.conn)

    def reconnect(self) -> None:
        """A new connection in place of this one (the server closed it: a restart, a terminated backend)."""
        fresh = PgmqClient(self._url, queue=self.queue)
        fresh.holder_label = self.holder_label
        old, self.conn = self.conn, fresh.conn
        fresh.conn = old
        fresh.close()  # the old connection, and an idle lock holder of this client's
        if self._idle_holder is not None:
            self._idle_holder.close()
            self._idle_holder = None

    def close(self) -> None:
        if self._idle_holder is not None:
            self._idle_holder.close()
            self._idle_holder = None
        self.conn.close()

    def clone(self) -> PgmqClient:
        """Another connection to the same database and queue."""
        other = PgmqClient(self._url, queue=self.queue)
        other.holder_label = self.holder_label
        return other

    def __enter__(self) -> PgmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run SQL (a whole script when there are no params); return rows of the last statement."""
        with self._cursor() as cur:
            cur.execute(sql.encode() if params is None else sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor whose Postgres errors become `QueueError`s (first line only, with the SQLSTATE)."""
        try:
            with self.conn.cursor() as cur:
                yield cur
        except psycopg.Error as e:
            err = QueueError(f"Postgres error: {_first_line(e)}")
            err.sqlstate = e.sqlstate
            raise err from None

    def transaction(self) -> Any:
        """A transaction on this connection (psycopg's context manager)."""
        return self.conn.transaction()

    @property
    def dlq(self) -> str:
        """The dead-letter queue of this client's queue."""
        return dlq_name(self.queue)

    def _table(self, queue: str | None = None) -> str:
        return f"pgmq.{ident('q_' + check_queue_name(queue or self.queue))}"

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

    def finish(self, ids: Sequence[int], *, queue: str | None = None) -> int:
        """Delete applied messages from this queue (or `queue`; what `pgmq.delete` does, without returning
        every id); returns how many were still there. The ids go as one array literal, as in `read_in_order`."""
        if not ids:
            return 0
        with self._cursor() as cur:
            cur.execute(f"DELETE FROM {self._table(queue)} WHERE msg_id = ANY(%s::bigint[])", [_id_array(ids)])
            return max(cur.rowcount, 0)

    @property
    def held(self) -> str:
        """The queue where this queue's changes of a drifted table wait (`engine/drift.py`)."""
        return held_name(self.queue)

    def hold(self, ids: Sequence[int]) -> None:
        """Copy messages (by msg_id, in msg_id order, byte for byte) into the held queue, created on first
        use. The caller deletes them from this queue in the same transaction."""
        if not ids:
            return
        if not self.queue_exists(self.held):
            self.execute("SELECT pgmq.create(%s)", [self.held])
        self.execute(
            f"INSERT INTO {self._table(self.held)} (vt, message) SELECT now(), message FROM {self._table()} "
            "WHERE msg_id = ANY(%s::bigint[]) ORDER BY msg_id",
            [_id_array(ids)],
        )

    def held_by_table(self) -> dict[str, int]:
        """Held changes per table (empty when nothing was ever held)."""
        if not self.queue_exists(self.held):
            return {}
        rows = self.execute(f"SELECT message->>'table', count(*) FROM {self._table(self.held)} GROUP BY 1")
        return {str(t): int(n) for t, n in rows}

    def read_held(self, tables: Sequence[str], qty: int) -> list[QueueMessage]:
        """The `qty` oldest held messages of these tables, in msg_id order (the order they were captured in)."""
        rows = self.execute(
            f"SELECT msg_id, read_ct, enqueued_at, message FROM {self._table(self.held)} "
            "WHERE message->>'table' = ANY(%s) ORDER BY msg_id LIMIT %s",
            [list(tables), qty],
        )
        return list(map(QueueMessage._make, rows))

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

    def read_in_order(
        self,
        qty: int,
        *,
        skip: Sequence[int] = (),
        as_text: bool = False,
        within: str | None = None,
        upto: int | None = None,
    ) -> list[QueueMessage]:
        """The `qty` oldest messages (msg_id order) except those in `skip`, read without touching them: no
        visibility timeout is set and no read is counted, so a message costs two row versions (its insert
        and its delete) instead of pgmq.read's three. For the holder of the consumer lock, which knows what
        it has read and not yet finished (`skip`). `<> ALL` over an array is hashed by Postgres 15+. With
        `as_text`, each message is its JSON text as UTF-8 `bytes`, not decoded (`loads_exact` decodes it as
        the connection would; a decoded message is never `bytes`, so the two cannot be confused). `within`
        (a snapshot's text) keeps only messages whose source transaction that snapshot sees as committed
        (and those without one); `upto` only msg_ids up to it (`core/txns.py`)."""
        # The ids go as one array literal in text: psycopg's list dumper costs more Python time per read
        # (taken from the thread that decodes) than the query itself.
        # As text, the rows come in binary: the JSON text arrives as it is (not hex-encoded, as a bytea is in
        # text), and the other columns need no parsing. Not when decoded: the connection's JSON loader
        # (`loads_exact`) is the text one.
        message = "convert_to(message::text, 'UTF8')" if as_text else "message"
        where, params = "msg_id <> ALL(%s::bigint[])", [_id_array(skip)]
        if within is not None:
            where += f" AND {_VISIBLE}"
            params.append(within)
        if upto is not None:
            where += " AND msg_id <= %s"
            params.append(upto)
        with self._cursor() as cur:
            cur.execute(
                f"SELECT msg_id, read_ct, enqueued_at, {message} FROM {self._table()} "
                f"WHERE {where} ORDER BY msg_id LIMIT %s",
                [*params, qty],
                binary=as_text,
            )
            return list(map(QueueMessage._make, cur.fetchall()))

    def snapshot(self) -> str:
        """The current Postgres snapshot, `xmin:xmax:xip` (what a read right now sees as committed)."""
        return str(self.execute("SELECT pg_current_snapshot()::text")[0][0])

    def txn_ranges(self, *, skip: Sequence[int], within: str) -> list[tuple[int, int, int | None]]:
        """Per source transaction visible in snapshot `within`, its first and last msg_id among the queued
        messages (a message without one is its own range). One pass over the queue, reading no more of a
        message than its `xid` key (`core/txns.py`, `valid_cut`)."""
        rows = self.execute(
            f"SELECT min(msg_id), max(msg_id), (message->>'xid')::bigint FROM {self._table()} "
            f"WHERE msg_id <> ALL(%s::bigint[]) AND {_VISIBLE} "
            "GROUP BY coalesce(message->>'xid', '-' || msg_id::text), (message->>'xid')::bigint",
            [_id_array(skip), within],
        )
        return [(int(lo), int(hi), None if x is None else int(x)) for lo, hi, x in rows]

    def release(self, ids: Sequence[int]) -> None:
        """Make these messages visible again at once (a reader hands back what it read but will not apply)."""
        if ids:
            self.execute(f"UPDATE {self._table()} SET vt = now() WHERE msg_id = ANY(%s)", [list(ids)])

    def enqueue(self, messages: Sequence[Any]) -> list[int]:
        """Insert messages, visible at once and in the given order, in the caller's transaction (if any);
        returns their msg_ids. The same columns `pgmq.send_batch` fills, without a function call."""
        if not messages:
            return []
        rows = self.execute(
            f"INSERT INTO {self._table()} (vt, message) "
            "SELECT now(), m FROM unnest(%s::jsonb[]) WITH ORDINALITY AS u(m, n) ORDER BY n RETURNING msg_id",
            [[Jsonb(m) for m in messages]],
        )
        self.notify()
        return sorted(int(r[0]) for r in rows)

    def notify(self) -> None:
        """Wake a streaming apply, as the capture triggers do (delivered when the caller's transaction commits)."""
        self.execute("SELECT pg_notify(%s, '')", [notify_channel(self.queue)])

    def contains(self, msg_id: int) -> bool:
        """Whether the message is still in the queue (not yet applied and deleted)."""
        return bool(self.execute(f"SELECT EXISTS (SELECT 1 FROM {self._table()} WHERE msg_id = %s)", [msg_id])[0][0])

    def span(self) -> int:
        """At least as many as the messages queued: the newest msg_id less the oldest, plus one (two reads of
        the primary key's index, unlike a count); 0 when the queue is empty."""
        t = self._table()
        (n,) = self.execute(f"SELECT (SELECT max(msg_id) FROM {t}) - (SELECT min(msg_id) FROM {t}) + 1")[0]
        return int(n or 0)

    def waiting_upto(self, msg_id: int) -> bool:
        """Whether any message up to `msg_id` is still in the queue (not yet applied and deleted)."""
        return bool(self.execute(f"SELECT EXISTS (SELECT 1 FROM {self._table()} WHERE msg_id <= %s)", [msg_id])[0][0])

    def delete_for_tables(self, tables: Sequence[str], *, queue: str | None = None) -> int:
        """Delete the messages of these tables from the queue (or another, e.g. the dead-letter queue)."""
        rows = self.execute(
            f"DELETE FROM {self._table(queue)} WHERE message->>'table' = ANY(%s) RETURNING 1", [list(tables)]
        )
        return len(rows)

    def dead_letters_by_table(self) -> dict[str, int]:
        """Dead-lettered messages per table (`?` for messages that named no table)."""
        rows = self.execute(
            f"SELECT coalesce(message->>'table', '?'), count(*) FROM {self._table(self.dlq)} GROUP BY 1"
        )
        return {t: int(n) for t, n in rows}

    def queued_tables(self, limit: int = 10_000) -> set[str]:
        """The tables named by the oldest `limit` queued messages (index order: a bounded read)."""
        rows = self.execute(
            f"SELECT DISTINCT message->>'table' FROM (SELECT message FROM {self._table()} ORDER BY msg_id LIMIT %s) m",
            [limit],
        )
        return {t for (t,) in rows if t is not None}

    def queued_by_table(self) -> dict[str, tuple[int, int, bool, float | None]]:
        """Per table named in queued messages: (messages, row changes they carry, whether a TRUNCATE is
        among them, age in seconds of the oldest). Row changes as `core.messages.message_rows` counts them."""
        rows = self.execute(
            f"SELECT message->>'table', count(*), sum({ROW_CHANGES_SQL}), "
            "bool_or(message->>'type' = 'TRUNCATE'), extract(epoch FROM now() - min(enqueued_at)) "
            f"FROM {self._table()} GROUP BY 1"
        )
        return {
            t: (int(n), int(changes), bool(truncate), float(age) if age is not None else None)
            for t, n, changes, truncate, age in rows
        }

    def queue_table_dead_rows(self) -> tuple[str, int, bool, str] | None:
        """(queue table, dead rows Postgres counts in it, whether this role may vacuum it, this role), or
        None when Postgres has no statistics for it yet."""
        table = self._table()
        rows = self.execute(
            "SELECT s.n_dead_tup, pg_has_role(c.relowner, 'USAGE'), current_user FROM pg_stat_user_tables s "
            "JOIN pg_class c ON c.oid = s.relid WHERE s.relid = to_regclass(%s)",
            [table],
        )
        return (table, int(rows[0][0]), bool(rows[0][1]), str(rows[0][2])) if rows else None

    def vacuum_queue_table(self) -> None:
        """A plain VACUUM (ANALYZE) of the queue table: takes no lock that writers wait for."""
        self.execute(f"VACUUM (ANALYZE) {self._table()}")

    def dead_letter(
        self, items: Sequence[tuple[int, str, str | None]], *, dlq: str | None = None, source: str | None = None
    ) -> list[int]:
        """Copy messages (by msg_id, with a reason and table) from the queue (or `source`, e.g. the held
        queue) to the dead-letter queue.

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
                  FROM {self._table(source)} q
                  JOIN unnest(%s::bigint[], %s::text[], %s::text[]) AS e(id, reason, tbl) ON q.msg_id = e.id
                  ORDER BY q.msg_id))""",
            [check_queue_name(dlq or self.dlq), source or self.queue, list(ids), list(reasons), list(tables)],
        )
        return [r[0] for r in rows]

    def purge(self, queue: str | None = None) -> int:
        return int(self.execute("SELECT pgmq.purge_queue(%s)", [queue or self.queue])[0][0])

    @contextmanager
    def consumer_lock(self) -> Iterator[bool]:
        """The single-consumer lock of this queue; yields whether it was taken.

        Held as a transaction-level advisory lock by a connection of its own whose transaction stays open
        while the lock is held. A transaction pins one server connection behind any pooler (pgbouncer or
        Supavisor in transaction mode, whatever the port), so the lock is really held, by exactly that
        backend; a session lock taken through such a pooler is held by whichever server connection ran the
        statement, and released, or leaked, on another. When this process dies, the pooler or Postgres ends
        the transaction and the lock is gone: nothing leaks. The transaction takes no transaction id and
        keeps no snapshot between statements, so it holds back no vacuum; `idle_in_transaction_session_timeout`
        is switched off for it alone (SET LOCAL). `check_consumer_lock` proves, before messages are deleted,
        that this backend still holds the lock. Held already by this client (the streaming run keeps it
        through a retry's wait), it yields True and leaves the lock to the outer holder."""
        if self._lock_holder is not None:
            yield True
            return
        # The lock's statements carry no bound parameters: a parameterised statement leaves its portal open,
        # and with it a snapshot that would hold back vacuum for as long as the lock is held.
        # The connection is kept for the next call (the health checks try every 0.2 s while an apply runs):
        # between calls it is idle outside a transaction, so a pooler pins nothing for it. A kept connection
        # that the server or the pooler closed meanwhile is replaced once.
        kept, self._idle_holder = self._idle_holder, None
        try:
            holder, got = self._try_lock(kept)
        except QueueError as e:
            raise QueueError(_lock_refused(str(e))) from None
        healthy = True
        try:
            self._lock_holder = holder if got else None
            yield got
        finally:
            self._lock_holder = None
            try:
                holder.conn.rollback()
            except psycopg.Error:
                healthy = False  # the connection is gone, and its transaction with it
            if healthy and not holder.conn.closed and self._idle_holder is None:
                self._idle_holder = holder
            else:
                holder.close()

    def _try_lock(self, kept: PgmqClient | None) -> tuple[PgmqClient, bool]:
        """Take the lock's transaction on `kept` (or on a new connection when it is None or turns out dead);
        returns the connection used and whether the lock was taken."""
        sql = (
            "SELECT pg_try_advisory_xact_lock(hashtextextended({}, 0)), "
            "set_config('idle_in_transaction_session_timeout', '0', true), "
            "set_config('application_name', {}, true)".format(
                literal(lock_name(self.queue)),
                literal(self._holder_name("consumer")),
            )
        )
        if kept is not None:
            try:
                kept.conn.autocommit = False
                return kept, bool(kept.execute(sql)[0][0])
            except (QueueError, psycopg.Error):
                kept.close()  # closed meanwhile: a fresh connection below
        holder = self.clone()
        holder.conn.autocommit = False
        try:
            return holder, bool(holder.execute(sql)[0][0])
        except QueueError:
            holder.close()
            raise

    def _holder_name(self, role: str) -> str:
        """The lock's application name. Postgres keeps 63 bytes of it: with a label, the label and the pid
        go before the queue's name (`d1sync consumer [run 471bc944] (pid 123) of <queue>`)."""
        if self.holder_label:
            return f"d1sync {role} [{self.holder_label}] (pid {os.getpid()}) of {self.queue}"
        return f"d1sync {role} of {self.queue} (pid {os.getpid()})"

    @contextmanager
    def standby_lock(self) -> Iterator[bool]:
        """While a run waits for the consumer lock: this queue's standby lock, on a connection of its own, in
        a transaction kept open (as `consumer_lock`); yields whether it was taken (another standby may hold
        it). It goes with the process, so a standby that holds it is alive."""
        holder = self.clone()
        holder.conn.autocommit = False
        try:
            got = bool(
                holder.execute(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended({}, 0)), "
                    "set_config('idle_in_transaction_session_timeout', '0', true), "
                    "set_config('application_name', {}, true)".format(
                        literal(standby_lock_name(self.queue)), literal(self._holder_name("standby"))
                    )
                )[0][0]
            )
            yield got
        finally:
            holder.close()

    def check_consumer_lock(self) -> None:
        """Raise unless this client's consumer lock (`consumer_lock`) is still held by its backend: the lock's
        connection and transaction are alive and `pg_locks` shows the lock granted to that very backend."""
        holder = self._lock_holder
        if holder is None:
            return
        try:
            held = holder.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND granted AND objsubid = 1 "
                f"AND (classid::bigint << 32) | objid::bigint = hashtextextended({literal(lock_name(self.queue))}, 0))"
            )[0][0]
        except QueueError as e:
            held, why = False, str(e)
        else:
            why = "pg_locks does not show it"
        if not held:
            raise QueueError(
                f"the single-consumer lock was lost ({why}); stopped before deleting anything: the batch is "
                "replayed by the next run"
            )

    def lock_holders(self, *, standby: bool = False) -> list[tuple[int, str, datetime | None]]:
        """Who holds this queue's consumer lock (or with `standby`, its standby lock): (pid, application name,
        since when) for each backend (an advisory lock belongs to one database: the same queue name in
        another database is another lock)."""
        name = standby_lock_name(self.queue) if standby else lock_name(self.queue)
        return [
            (int(pid), str(app or ""), since)
            for pid, app, since in self.execute(
                "SELECT a.pid, a.application_name, coalesce(a.xact_start, a.backend_start) FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND l.objsubid = 1 AND (l.classid::bigint << 32) | l.objid::bigint = hashtextextended(%s, 0)",
                [name],
            )
        ]

    def pgmq_install(self) -> str:
        """How PGMQ is installed here: `<version> (extension)` (Supabase), `SQL install` (the plain-SQL
        script, which records no version), or `missing`."""
        rows = self.execute("SELECT extversion FROM pg_extension WHERE extname = 'pgmq'")
        if rows:
            return f"{rows[0][0]} (extension)"
        return "SQL install" if self.has_pgmq() else "missing"

    #: The oid of a queue's table, found through the catalog (no USAGE on schema pgmq needed, unlike a name).
    _QUEUE_OID = (
        "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'pgmq' AND c.relname = %s)"
    )

    def queue_exists(self, queue: str | None = None) -> bool:
        """Whether the queue's table exists (PGMQ created the queue)."""
        rows = self.execute(f"SELECT {self._QUEUE_OID} IS NOT NULL", [f"q_{queue or self.queue}"])
        return bool(rows[0][0])

    def require_queue(self) -> None:
        """Raise `ConfigError` with the fix when PGMQ or this queue is missing (before setup, or a mistyped
        `D1SYNC_QUEUE`), instead of the Postgres error a first query would give."""
        if not self.has_pgmq():
            raise ConfigError(
                "PGMQ is not installed in this database, so there is no queue yet: run d1sync setup (it creates the "
                "pgmq extension where it can; add --install-pgmq where no extension is available, to install the "
                "PGMQ SQL bundled with d1sync). On Supabase you may enable pgmq under Database, Extensions first"
            )
        if not self.queue_exists():
            known = [
                q
                for (q,) in self.execute("SELECT queue_name FROM pgmq.meta ORDER BY 1")
                if not q.endswith(("_dlq", "_held"))
            ]
            raise ConfigError(
                f"the queue {self.queue} does not exist in this database"
                + (f" (queues here: {', '.join(known)})" if known else " (it has no queue yet)")
                + f": check D1SYNC_QUEUE (default {DEFAULT_QUEUE}), or create it with its capture by running "
                f"d1sync setup with D1SYNC_QUEUE={self.queue}"
            )

    def missing_queue_rights(self, queue: str | None = None) -> list[str]:
        """The rights this role lacks on a queue: USAGE on schema pgmq, and SELECT, INSERT, UPDATE, DELETE on
        its table (what apply, backfill and dead-lettering need). Empty when it has them all."""
        table = self._table(queue)
        if not self.execute("SELECT has_schema_privilege('pgmq', 'USAGE')")[0][0]:
            return ["USAGE on schema pgmq"]
        rows = self.execute(
            f"SELECT p FROM unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE']) p "
            f"WHERE NOT has_table_privilege({self._QUEUE_OID}, p)",
            [f"q_{queue or self.queue}"],
        )
        return [f"{p} on {table}" for (p,) in rows]

    def queue_owner(self) -> tuple[str, bool]:
        """The queue table's owner, and whether this role may act as it (vacuum the table)."""
        rows = self.execute(
            "SELECT pg_get_userbyid(relowner), pg_has_role(relowner, 'USAGE') FROM pg_class "
            f"WHERE oid = {self._QUEUE_OID}",
            [f"q_{self.queue}"],
        )
        return (str(rows[0][0]), bool(rows[0][1])) if rows else ("", False)

    def function_source(self, schema: str, name: str) -> str | None:
        """The body of the function `schema.name` (without arguments), or None where there is none."""
        rows = self.execute(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0",
            [schema, name],
        )
        return str(rows[0][0]) if rows else None

    def capture_triggers(
        self, relation: str, function_schema: str, function: str
    ) -> list[tuple[str, bool, bool, bool]]:
        """The triggers on `relation` that call `function_schema.function`: (name, enabled, the function
        writes to this queue, the function's owner may insert into this queue's table). Found through the
        catalog, so a role without USAGE on those schemas is still answered."""
        return [
            (str(name), bool(enabled), bool(ours), bool(can_insert))
            for name, enabled, ours, can_insert in self.execute(
                "SELECT t.tgname, t.tgenabled <> 'D', "
                "position(%s in p.prosrc) > 0 OR position(%s in p.prosrc) > 0, "
                f"has_table_privilege(p.proowner, {self._QUEUE_OID}, 'INSERT') "
                "FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE t.tgrelid = to_regclass(%s) AND NOT t.tgisinternal AND n.nspname = %s AND p.proname = %s",
                [ident(f"q_{self.queue}"), f"'{self.queue}'", f"q_{self.queue}", relation, function_schema, function],
            )
        ]

    def schema_rights(self, schema: str) -> tuple[str, str | None, bool, bool]:
        """(this role, the schema's owner or None when it does not exist, USAGE, CREATE) on `schema`."""
        rows = self.execute(
            "SELECT current_user, pg_get_userbyid(n.nspowner), has_schema_privilege(n.oid, 'USAGE'), "
            "has_schema_privilege(n.oid, 'CREATE') FROM (SELECT 1) x LEFT JOIN pg_namespace n ON n.nspname = %s",
            [schema],
        )
        role, owner, usage, create = rows[0]
        return str(role), owner, bool(usage), bool(create)

    def has_pgmq(self) -> bool:
        return bool(self.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgmq')")[0][0])


def describe_holders(holders: Sequence[tuple[int, str, datetime | None]]) -> str:
    """`lock_holders()` in words: "pid 123 (d1sync consumer of q (pid 45), since 2026-12-01 10:00:00 UTC)".
    Another role's session shows no application name or start unless this role may read its activity
    (pg_read_all_stats)."""
    return ", ".join(
        f"pid {pid} ({app or 'application name not visible'}"
        + (f", since {since:%Y-%m-%d %H:%M:%S %Z}".rstrip() if since else "")
        + ")"
        for pid, app, since in holders
    )


def _lock_refused(error: str) -> str:
    """Why the consumer lock could not be taken, with the fix where a pooler is the cause."""
    if "statement pooling" in error or "transaction blocks not allowed" in error:
        return (
            f"the single-consumer lock needs a transaction, and this connection's pooler runs in statement mode "
            f"({error}): use a direct connection, or a pooler in session or transaction mode (Supabase: port "
            "5432 or 6543)"
        )
    return f"cannot take the single-consumer lock: {error}"


#: A message whose source transaction the snapshot parameter sees as committed, or one without a transaction.
_VISIBLE = "(message->>'xid' IS NULL OR pg_visible_in_snapshot((message->>'xid')::xid8, %s::pg_snapshot))"


def _id_array(ids: Sequence[int]) -> str:
    """Message ids as one `bigint[]` literal in text: psycopg's list dumper costs more Python time than the
    statement it serves."""
    return "{" + ",".join(map(str, ids)) + "}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


log = logging.getLogger(__name__)


class ChangeListener:
    """What the streaming apply waits on when the queue is empty: the notification the capture triggers send
    at commit (LISTEN on a connection of its own), or, where notifications cannot arrive, a short poll.

    Whether they arrive is proven, not assumed: after LISTEN the listener sends itself a notification from the
    client's connection and waits up to `probe_seconds` for it. Through a transaction pooler the LISTEN and
    the notification land on server sessions that are not this client's, so the probe fails and `wait` polls
    every `poll_seconds` instead. A listening connection that breaks falls back to polling too. Either way
    `wait` returns at the latest after `poll_seconds` (a notification can also be lost with its connection).
    """

    def __init__(self, client: PgmqClient, *, poll_seconds: float, probe_seconds: float = 2.0) -> None:
        self.channel = notify_channel(client.queue)
        self.poll_seconds = poll_seconds
        self.listening = False
        self.reason = ""
        self._url = client._url
        self._conn: psycopg.Connection[Any] | None = None
        if client.pooled:
            self.reason = "the connection goes through a transaction pooler, which does not deliver notifications"
            return
        self._conn = client.clone().conn  # a connection of its own, closed by close()
        try:
            self._conn.execute(f"LISTEN {ident(self.channel)}")
            client.execute("SELECT pg_notify(%s, 'probe')", [self.channel])
            self.listening = any(True for _ in self._conn.notifies(timeout=probe_seconds, stop_after=1))
        except psycopg.Error as e:
            self.reason = f"LISTEN failed: {scrub(str(e), client._url)}"
        if not self.listening:
            self.reason = self.reason or (
                f"a notification sent to {self.channel} did not arrive within {probe_seconds:g}s (a pooler between "
                "d1sync and Postgres?)"
            )
            self.close()

    @property
    def mode(self) -> str:
        if self.listening:
            return f"woken by notifications on {self.channel} (and looking every {self.poll_seconds:g}s)"
        return f"polling every {self.poll_seconds:g}s: {self.reason}"

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a notification; whether one came (always False when polling)."""
        if self._conn is None:
            time.sleep(timeout)
            return False
        try:
            return any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error as e:
            why = scrub(str(e), self._url)
            log.warning("the notification listener broke (%s); polling every %gs from now on", why, self.poll_seconds)
            self.listening, self.reason = False, "the listening connection broke"
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
