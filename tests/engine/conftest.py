import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair


@pytest.fixture
def pair(source_db, d1):
    """Example tables in a fresh Postgres, capture installed, D1 tables created (both D1 backends)."""
    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(source_db) as pg:
        setup(pg, d1, schema)
        yield Pair(pg, d1, schema)


@pytest.fixture
def local_pair(source_db, d1_local):
    """The same, on the local D1 file only (for tests whose child processes open that file)."""
    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(source_db) as pg:
        setup(pg, d1_local, schema)
        yield Pair(pg, d1_local, schema)
