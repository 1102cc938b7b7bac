from collections.abc import Iterator

import pytest

from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair


def _set_up_pair(source_db: str, d1: D1Client) -> Iterator[Pair]:
    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(source_db) as pg:
        setup(pg, d1, schema)
        yield Pair(pg, d1, schema)


@pytest.fixture
def pair(source_db, d1):
    """Example tables in a fresh Postgres, capture installed, D1 tables created (both D1 backends)."""
    yield from _set_up_pair(source_db, d1)


@pytest.fixture
def local_pair(source_db, d1_local):
    """The same, on the local D1 file only (for tests whose child processes open that file)."""
    yield from _set_up_pair(source_db, d1_local)
