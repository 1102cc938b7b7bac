"""Quoting for identifiers and literals. Names reaching here were validated by `schema.check_identifier`
(no quotes, no NUL); quoting still doubles quotes so a mistake can never open an injection."""

from __future__ import annotations

import re

from d1sync_dagster.errors import SchemaError

_QUEUE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


def ident(name: str) -> str:
    """A double-quoted identifier, valid in both Postgres and SQLite."""
    if "\x00" in name:
        raise SchemaError("identifier contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A single-quoted string literal, valid in both Postgres (standard_conforming_strings) and SQLite."""
    if "\x00" in text:
        raise SchemaError("literal contains a NUL character")
    return "'" + text.replace("'", "''") + "'"


def check_queue_name(name: str) -> str:
    """PGMQ makes tables `q_<name>` and `a_<name>`; keep names lower-case, short and plain."""
    if not _QUEUE_NAME.match(name):
        raise SchemaError(
            f"queue name {name!r} is invalid: use lower-case letters, digits and underscores, at most 40 characters"
        )
    return name
