"""D1 as a local SQLite file: the embedded default, with D1's limits enforced so local runs fail where
production would: 100 bound parameters, 100 KB statements, 100 columns in a table and in a result,
2,000,000 bytes in a value or row, 32 arguments to a function, expressions 100 deep, no BEGIN/COMMIT,
parameters as strings.

Billing figures differ: `rows_written` here counts the table rows a statement changed, while D1 also
counts every index entry it wrote (and `rows_read` the rows a query scanned). Reports from this backend
are a lower bound of what D1 would bill.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d1sync_dagster.clients.d1 import QueryResult, encode_statements
from d1sync_dagster.core.statements import (
    MAX_BOUND_PARAMS,
    MAX_EXPR_DEPTH,
    MAX_FUNCTION_ARGS,
    MAX_RESULT_COLUMNS,
    MAX_ROW_BYTES,
    MAX_STATEMENT_BYTES,
    Param,
    Statement,
)
from d1sync_dagster.errors import D1Error

_TRANSACTION_WORDS = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE)\b", re.IGNORECASE)


def split_statements(sql: str) -> list[str]:
    """Split on top-level semicolons, using SQLite's own notion of a complete statement."""
    out, cur = [], ""
    for part in sql.split(";"):
        cur += part + ";"
        if sqlite3.complete_statement(cur):
            if cur.strip(" \t\r\n;"):
                out.append(cur.strip().rstrip(";").strip())
            cur = ""
    if cur.strip(" \t\r\n;"):
        out.append(cur.strip().rstrip(";").strip())
    return out


class LocalD1Client:
    """A SQLite file behind the `D1Client` interface; a batch is one transaction, as in D1."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect()
        self._reopen = False  # opened read-only at the file's level: open it again before the next request
        self._lock = threading.Lock()
        self.requests = 0

    def _connect(self) -> sqlite3.Connection:
        # No statement cache: apply's statements carry their values as literals, so no two texts are alike,
        # and the module's cache (128 by default) only kept the last 128 compiled multi-row statements alive:
        # 20-28 MB of a drain's peak memory.
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, cached_statements=0)
        # SQLite itself enforces D1's limits, so nothing that D1 would refuse slips through.
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_BOUND_PARAMS)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_STATEMENT_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_RESULT_COLUMNS)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_ROW_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_FUNCTION_ARG, MAX_FUNCTION_ARGS)
        conn.setlimit(sqlite3.SQLITE_LIMIT_EXPR_DEPTH, MAX_EXPR_DEPTH)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL cannot corrupt the file; a power cut may lose the last batches, which
        # the queue replays (nothing is deleted from it before the commit returns).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _refuse(self, e: sqlite3.Error, index: int) -> D1Error:
        """SQLite's error as D1's (`_refused`). A connection opened while the file could not be written (a disk
        read-only for a while, `chattr +i`) stays read-only after the file is writable again: refused as
        read-only while `query_only` is off, it is opened again before the next request."""
        if (getattr(e, "sqlite_errorname", None) or "").startswith("SQLITE_READONLY"):
            try:
                pragma = self._conn.execute("PRAGMA query_only").fetchone()[0]
            except sqlite3.Error:
                pragma = 0
            self._reopen = not pragma and str(self.path) != ":memory:"
        return _refused(e, index)

    def _fresh(self) -> None:
        """Open the file again when the last answer said the connection itself is read-only."""
        if self._reopen:
            self._reopen = False
            self._conn.close()
            self._conn = self._connect()

    def close(self) -> None:
        self._conn.close()

    def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        if not statements:
            return []
        encoded = encode_statements(statements)
        return self._run([(q["sql"], q["params"]) for q in encoded])

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[QueryResult]:
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        parts = split_statements(sql)
        if not parts:
            raise D1Error("No SQL statements detected.", statement_index=0)
        if len(parts) > 1 and params:
            raise D1Error("a query with several statements cannot take params", statement_index=0)
        return self._run([(p, encoded["params"] if len(parts) == 1 else []) for p in parts])

    def bookmark(self) -> str:
        """A consistent copy of the file next to it (SQLite's backup API); the copy's path is the bookmark."""
        if str(self.path) == ":memory:":
            raise D1Error("an in-memory database has no restore point")
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # two in one second never collide
        target = self.path.with_name(f"{self.path.stem}.bookmark-{stamp}{self.path.suffix}")
        with self._lock, sqlite3.connect(target) as dst:
            self._conn.backup(dst)
        return f"file:{target}"

    def restore(self, bookmark: str) -> str:
        """Put back the copy a `bookmark` names (SQLite's backup API, in place); returns a bookmark of the
        state just before, which undoes the restore."""
        source = Path(bookmark.removeprefix("file:")) if bookmark.startswith("file:") else None
        if source is None or not source.is_file():
            raise D1Error(f"no restore point {bookmark[:200]!r}: a local bookmark is file:<path of a copy>")
        before = self.bookmark()
        with self._lock, sqlite3.connect(source) as src:
            src.backup(self._conn)
        return before

    def raw(self, sql: str, params: Sequence[Param] = ()) -> tuple[list[str], list[list[Any]], dict[str, Any]]:
        """Rows as arrays, like the HTTP API's `/raw`."""
        (encoded,) = encode_statements([Statement(sql, tuple(params))])
        with self._lock:
            self.requests += 1
            self._fresh()
            try:
                cur = self._conn.execute(sql, encoded["params"])
                rows = [list(r) for r in cur.fetchall()]
            except sqlite3.Error as e:
                raise self._refuse(e, 0) from None
        cols = [d[0] for d in cur.description or []]
        return cols, rows, {"rows_read": len(rows), "rows_written": 0}

    def _run(self, stmts: list[tuple[str, list[str | None]]]) -> list[QueryResult]:
        for i, (sql, _) in enumerate(stmts):
            if _TRANSACTION_WORDS.match(sql):
                raise D1Error(
                    "D1 refuses BEGIN/COMMIT/SAVEPOINT; a batch is already a transaction", statement_index=i, kind="sql"
                )
        out = []
        with self._lock:
            self.requests += 1
            self._fresh()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:  # another process holds the file's write lock past busy_timeout
                raise self._refuse(e, 0) from None
            try:
                for i, (sql, params) in enumerate(stmts):
                    before = self._conn.total_changes
                    started = time.perf_counter()
                    try:
                        cur = self._conn.execute(sql, params)
                        rows = cur.fetchall()
                    except sqlite3.Error as e:
                        raise self._refuse(e, i) from None
                    cols = [d[0] for d in cur.description or []]
                    changes = self._conn.total_changes - before
                    meta = {
                        "changes": changes,
                        "rows_written": changes,
                        "rows_read": len(rows),
                        "last_row_id": cur.lastrowid,
                        "duration": (time.perf_counter() - started) * 1000,
                    }
                    out.append(QueryResult([dict(zip(cols, r, strict=True)) for r in rows], meta))
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as e:  # the write itself failed: a disk gone read-only or full, an I/O error
                    raise self._refuse(e, len(stmts) - 1) from None
            except BaseException:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite has rolled the transaction back itself (its answer above says why)
                raise
        return out


#: SQLite result codes that are about the moment (another writer, I/O, a read-only file), not about the
#: statement: never dead-lettered (`clients/d1_errors.py` classifies D1's answers the same way).
_TEMPORARY = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_NOMEM", "SQLITE_INTERRUPT", "SQLITE_READONLY")


def _refused(e: sqlite3.Error, index: int) -> D1Error:
    """SQLite's error as D1 words it (`<message>: SQLITE_<CODE>`, code 7500), classified like D1's."""
    name = getattr(e, "sqlite_errorname", None) or "SQLITE_ERROR"
    kind = "temporary" if name.startswith(_TEMPORARY) else "quota" if name.startswith("SQLITE_FULL") else "sql"
    return D1Error(f"D1 (local) refused the statement: {e}: {name}", statement_index=index, code=7500, kind=kind)
