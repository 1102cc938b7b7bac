"""Injected D1 faults during apply (through the HTTP stand-in on the real D1 engine)."""

import pytest

from d1sync_dagster.clients.d1 import RetryPolicy
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import D1Error
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair


@pytest.fixture
def http_pair(source_db, d1_standin):
    d1_standin.reset()
    schema = load_schema(ROOT / "schema.json")
    d1 = d1_standin.client(sleep=lambda s: None, retry=RetryPolicy(attempts=3, base_delay=0.01))
    with PgmqClient(source_db) as pg:
        setup(pg, d1, schema)
        yield Pair(pg, d1, schema), d1_standin
    d1.close()


def write_some(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 200) g")
    pair.sql("UPDATE apps SET name = 'u' WHERE id % 2 = 0")
    pair.sql("DELETE FROM apps WHERE id % 9 = 0")


def test_500_and_429_mid_drain_are_retried_and_the_drain_completes(http_pair):
    pair, standin = http_pair
    write_some(pair)
    standin.inject({"status": 500}, {"status": 429, "headers": {"retry-after": "1"}})
    report = pair.apply(batch_size=50)
    assert report.drained and report.dead_lettered == 0
    pair.assert_in_sync()


def test_response_lost_after_d1_committed_is_replayed_harmlessly(http_pair):
    pair, standin = http_pair
    write_some(pair)
    standin.inject({"status": 500, "after": True}, {"status": 502, "after": True})
    report = pair.apply(batch_size=60)
    assert report.drained and report.dead_lettered == 0
    pair.assert_in_sync()


def test_persistent_outage_stops_the_run_and_loses_nothing(http_pair):
    pair, standin = http_pair
    write_some(pair)
    depth = pair.queue_depth()
    standin.inject(*[{"status": 503}] * 3)
    with pytest.raises(D1Error, match="503") as e:
        pair.apply(batch_size=50, vt_seconds=0)
    assert e.value.retryable
    assert pair.queue_depth() == depth  # nothing deleted
    report = pair.apply()
    assert report.drained
    pair.assert_in_sync()


def test_worker_crash_mid_batch_is_retried(http_pair):
    pair, standin = http_pair
    write_some(pair)
    standin.inject({"crash": True})
    assert pair.apply().dead_lettered == 0
    pair.assert_in_sync()
