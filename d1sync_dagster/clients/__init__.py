"""Thin, real I/O: Postgres/PGMQ (psycopg) and D1 (HTTP API over httpx, or a local SQLite file)."""
