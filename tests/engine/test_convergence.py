"""Randomized convergence: random writes, applies, backfills and reconciles, with faults injected at the
engine's step boundaries; after the queue drains, D1 must equal Postgres and every message be accounted for.

Reproducible from its seed (printed on failure). CI runs a fixed set of seeds; `pytest --long` runs more.
Faults: the D1 API answering 500, 429 or crashing, before or after D1 committed, or answering after the
client's timeout (HTTP stand-in); the connection reset before or after D1 committed; the process dying
between the D1 commit and the queue delete; the Postgres connection killed mid-run; messages read with a
zero visibility timeout, so a slow apply sees its own batch become visible again. Three writer connections:
one between engine runs, two during them.
"""

import random
import threading

import httpx
import psycopg

from d1sync_dagster.clients.d1 import RetryPolicy
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import D1SyncError
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair

SCHEMA = load_schema(ROOT / "schema.json")
CI_SEEDS = [11, 23, 37]


class Crash(Exception):
    """The process dying at the worst moment."""


def random_transaction(conn: psycopg.Connection, rnd: random.Random) -> None:
    op = rnd.random()
    k = rnd.randint(1, 60)
    with conn.transaction(force_rollback=rnd.random() < 0.1):
        if op < 0.25:
            n = rnd.randint(1, 5)
            conn.execute(
                "INSERT INTO apps (id, name, rating, settings, is_public) SELECT g, %s, %s, %s::jsonb, %s "
                "FROM generate_series(%s::bigint, %s::bigint) g ON CONFLICT (id) DO NOTHING",
                [
                    f"n{rnd.random():.3f}",
                    rnd.choice([None, rnd.uniform(-1e6, 1e6)]),
                    '{"a": [1, 2.5]}',
                    rnd.random() < 0.5,
                    k,
                    k + n,
                ],
            )
        elif op < 0.5:
            conn.execute(
                "UPDATE apps SET name = %s, rating = %s WHERE id BETWEEN %s AND %s",
                [f"u{rnd.random():.4f}", rnd.random(), k, k + rnd.randint(0, 10)],
            )
        elif op < 0.6:
            conn.execute("DELETE FROM apps WHERE id BETWEEN %s AND %s", [k, k + rnd.randint(0, 3)])
        elif op < 0.68:
            conn.execute(
                "UPDATE apps SET id = id + 1000 WHERE id = %s AND NOT EXISTS (SELECT 1 FROM apps WHERE id = %s)",
                [k, k + 1000],
            )
        elif op < 0.75:
            conn.execute("DELETE FROM apps WHERE id = %s", [k])
            conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'reborn')", [k])
        elif op < 0.9:
            conn.execute(
                "INSERT INTO app_versions (app_id, version, downloads) VALUES (%s, %s, %s) "
                "ON CONFLICT (app_id, version) DO UPDATE SET downloads = excluded.downloads",
                [k % 7, f"v{k % 5}", rnd.randint(0, 2**62)],
            )
        elif op < 0.97:
            conn.execute(
                "UPDATE app_versions SET version = version || 'x' WHERE app_id = %s AND length(version) < 6", [k % 7]
            )
        else:
            conn.execute(rnd.choice(["TRUNCATE apps", "TRUNCATE app_versions"]))


def burst(url: str, seed: int) -> None:
    rnd = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(rnd.randint(1, 6)):
            try:
                random_transaction(conn, rnd)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                pass  # as an application would: that transaction rolled back


class ResettingTransport(httpx.BaseTransport):
    """An injected fault: the next request's connection resets, before D1 saw it or after D1 committed."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.reset: str | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        when, self.reset = self.reset, None
        if when == "before":
            raise httpx.ConnectError("connection reset (injected)", request=request)
        response = self.inner.handle_request(request)
        if when == "after":
            response.read()
            raise httpx.RemoteProtocolError("connection reset after D1 committed (injected)", request=request)
        return response


def inject(rnd: random.Random, standin, transport: ResettingTransport) -> dict:
    """Pick this round's fault; returns apply keyword overrides."""
    fault = rnd.choice(
        [
            "none",
            "500",
            "500-after",
            "429",
            "crash",
            "timeout-after",
            "reset",
            "reset-after",
            "die-after-commit",
            "kill-pg",
            "vt0",
        ]
    )
    standin.inject(clear=True)
    if fault == "reset":
        transport.reset = "before"
    elif fault == "reset-after":
        transport.reset = "after"
    elif fault == "timeout-after":
        standin.inject({"after": True, "delay_ms": 1500})  # committed, answered after the client's timeout
    if fault == "500":
        standin.inject({"status": 500})
    elif fault == "500-after":
        standin.inject({"status": 502, "after": True})
    elif fault == "429":
        standin.inject({"status": 429, "headers": {"retry-after": "0"}})
    elif fault == "crash":
        standin.inject({"crash": True})
    return {"fault": fault}


def run_seed(seed: int, source_db: str, standin) -> None:
    rnd = random.Random(seed)
    standin.reset()
    transport = ResettingTransport()  # faults injected on purpose: connection resets
    d1 = standin.client(
        sleep=lambda s: None, retry=RetryPolicy(attempts=2, base_delay=0.0), timeout=1.0, transport=transport
    )
    with PgmqClient(source_db) as pg, psycopg.connect(source_db, autocommit=True) as writer:
        # (the main writer's transactions run between engine runs, the burst writer's during them)
        setup(pg, d1, SCHEMA)
        pair = Pair(pg, d1, SCHEMA)
        for _round in range(14):
            for _ in range(rnd.randint(1, 8)):
                try:
                    random_transaction(writer, rnd)
                except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                    pass  # as an application would: that transaction rolled back
            fault = inject(rnd, standin, transport)["fault"]
            options = ApplyOptions(batch_size=rnd.choice([3, 10, 100]), vt_seconds=0 if fault == "vt0" else 30)
            hook = None
            if fault == "die-after-commit":

                def hook(ids):
                    raise Crash

            consumer = PgmqClient(source_db)
            if fault == "kill-pg":

                def hook(ids, pid=consumer.conn.info.backend_pid):
                    writer.execute("SELECT pg_terminate_backend(%s)", [pid])

            # A second writer keeps writing while the engine runs (its own seed, so the run stays reproducible
            # up to thread timing; the assertion does not depend on the interleaving).
            concurrent = [
                threading.Thread(target=burst, args=(source_db, seed * 1000 + _round * 10 + i)) for i in range(2)
            ]
            for t in concurrent:
                t.start()
            try:
                choice = rnd.random()
                if choice < 0.15:
                    backfill(consumer, d1, SCHEMA, chunk_size=rnd.choice([7, 50]), apply_options=options)
                elif choice < 0.25:
                    reconcile(consumer, d1, SCHEMA, chunk_size=25, repair_drift=True, apply_options=options)
                else:
                    apply(consumer, d1, SCHEMA, options, after_d1_commit=hook)
            except (D1SyncError, Crash):
                pass
            finally:
                for t in concurrent:
                    t.join()
                try:
                    consumer.close()
                except Exception:
                    pass
        # Writers stop; drain without faults.
        standin.inject(clear=True)
        transport.reset = None
        final = apply(pg, d1, SCHEMA, ApplyOptions())
        assert final.drained
        assert pair.queue_depth() == 0, f"seed {seed}: queue not drained"
        letters = pair.dead_letters()
        assert letters == [], f"seed {seed}: unexpected dead letters {letters[:3]}"
        try:
            pair.assert_in_sync()
        except AssertionError as e:
            raise AssertionError(f"seed {seed} diverged: {e}") from None
    d1.close()


def seeds(config) -> list[int]:
    return CI_SEEDS + (list(range(100, 140)) if config.getoption("--long") else [])


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", seeds(metafunc.config))


def test_random_histories_with_faults_converge(seed, source_db, d1_standin):
    run_seed(seed, source_db, d1_standin)
