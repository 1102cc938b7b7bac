"""Backfill through real Postgres + PGMQ + D1, with concurrent writers, interruption and resume."""

import random
import threading
import time

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair

SCHEMA = load_schema(ROOT / "schema.json")


def load(source_db, d1, rows):
    """Rows that existed before capture was installed: only a backfill can bring them to D1."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO apps (id, owner_id, name, is_public, settings, rating, icon) "
            "SELECT g, gen_random_uuid(), 'app ' || g, g %% 2 = 0, jsonb_build_object('g', g), g / 7.0, "
            "'\\x0102'::bytea FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute(
            "INSERT INTO app_versions (app_id, version, downloads) "
            "SELECT g % 50, 'v' || g, g FROM generate_series(1, 500) g"
        )
    pg = PgmqClient(source_db)
    setup(pg, d1, SCHEMA)
    return Pair(pg, d1, SCHEMA), source_db


@pytest.fixture
def loaded(source_db, d1):
    pair, url = load(source_db, d1, 3000)
    yield pair, url
    pair.pg.close()


@pytest.fixture
def big(source_db, d1_local):
    """The 50,000-row table of the concurrency tests. What they prove is on the Postgres side (chunks,
    markers and writers in queue order), so one D1 backend suffices; the backends are held to each other by
    the contract tests."""
    pair, url = load(source_db, d1_local, 50_000)
    yield pair, url
    pair.pg.close()


def test_backfill_copies_existing_rows_in_chunks(loaded):
    pair, _ = loaded
    report = backfill(pair.pg, pair.d1, SCHEMA, chunk_size=700)
    assert report.tables["apps"].rows == 3000 and report.tables["apps"].chunks == 5
    assert report.tables["app_versions"].rows == 500 and report.tables["app_versions"].finished
    assert report.apply is not None and report.apply.drained and report.apply.dead_lettered == 0
    pair.assert_in_sync()


def test_backfill_of_one_table_only(loaded):
    pair, _ = loaded
    report = backfill(pair.pg, pair.d1, SCHEMA, tables=["app_versions"], chunk_size=100)
    assert list(report.tables) == ["app_versions"]
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 0}]
    (res,) = pair.d1.query("SELECT count(*) AS n FROM app_versions")
    assert res.results == [{"n": 500}]


def test_interrupted_backfill_resumes_after_its_last_chunk(loaded):
    pair, _ = loaded

    class Killed(Exception):
        pass

    def die_after_two(table, stats):
        if table == "apps" and stats.chunks == 2:
            raise Killed

    with pytest.raises(Killed):
        backfill(pair.pg, pair.d1, SCHEMA, chunk_size=500, on_chunk=die_after_two)
    resumed = backfill(pair.pg, pair.d1, SCHEMA, chunk_size=500)
    apps = resumed.tables["apps"]
    assert apps.resumed_from == ["1000"] and apps.rows == 2000 and apps.chunks == 4
    pair.assert_in_sync()
    # Finished: the next backfill starts over (and rewrites nothing, the rows are already right).
    again = backfill(pair.pg, pair.d1, SCHEMA, chunk_size=500)
    assert again.tables["apps"].resumed_from is None and again.tables["apps"].rows == 3000
    assert again.apply.rows_written == 0


def test_seed_backfill_snippet_output_is_harmless_next_to_a_backfill(loaded):
    from tests.engine.test_apply import SEED_BACKFILL

    pair, _ = loaded
    pair.sql(SEED_BACKFILL)
    backfill(pair.pg, pair.d1, SCHEMA, chunk_size=1000)
    pair.assert_in_sync()


def writer(url, stop, seed, errors, counts, rows):
    """Random transactions on apps: inserts, updates, deletes, key changes, rollbacks."""
    rnd = random.Random(seed)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                op = rnd.random()
                k = rnd.randint(1, rows)
                try:
                    with conn.transaction():
                        if op < 0.35:
                            conn.execute(
                                "UPDATE apps SET name = %s, rating = %s WHERE id = %s",
                                [f"w{seed}-{rnd.random()}", rnd.random(), k],
                            )
                        elif op < 0.5:
                            conn.execute("DELETE FROM apps WHERE id = %s", [k])
                        elif op < 0.7:
                            new = 100_000 + seed * 1_000_000 + counts[seed]
                            conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'new') ON CONFLICT DO NOTHING", [new])
                        elif op < 0.8:
                            conn.execute("UPDATE apps SET id = id + 5000000 WHERE id = %s", [k])
                        elif op < 0.9:
                            sql = (
                                "UPDATE apps SET settings = jsonb_build_object('x', %s::int) WHERE id BETWEEN %s AND %s"
                            )
                            conn.execute(sql, [k, k, k + 20])
                        else:
                            conn.execute("UPDATE apps SET name = 'rolled back' WHERE id = %s", [k])
                            raise _Rollback
                except _Rollback:
                    pass
                except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                    pass  # as an application would: the transaction rolled back
                counts[seed] += 1
                time.sleep(0.002)
    except Exception as e:  # surfaced by the test
        errors.append(e)


class _Rollback(Exception):
    pass


def run_with_writers(pair, url, *, rows, chunk_size, interrupt_after=None):
    stop, errors, counts = threading.Event(), [], [0] * 4
    threads = [threading.Thread(target=writer, args=(url, stop, i, errors, counts, rows)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        if interrupt_after is not None:

            class Killed(Exception):
                pass

            def die(table, stats):
                if table == "apps" and stats.chunks == interrupt_after:
                    raise Killed

            with pytest.raises(Killed):
                backfill(pair.pg, pair.d1, SCHEMA, chunk_size=chunk_size, on_chunk=die)
            apply(pair.pg, pair.d1, SCHEMA)
        backfill(pair.pg, pair.d1, SCHEMA, chunk_size=chunk_size)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert sum(counts) > 100, counts  # the writers really ran during the backfill
    report = apply(pair.pg, pair.d1, SCHEMA, ApplyOptions(batch_size=500))
    assert report.drained and report.dead_lettered == 0
    pair.assert_in_sync()


def test_backfill_of_50k_rows_converges_while_four_writers_write(big):
    pair, url = big
    run_with_writers(pair, url, rows=50_000, chunk_size=2000)


def test_backfill_killed_halfway_and_resumed_converges_while_writers_write(big):
    pair, url = big
    run_with_writers(pair, url, rows=50_000, chunk_size=2000, interrupt_after=12)


def test_writer_transaction_held_open_across_a_chunk_read(loaded):
    """A writer changes a row and keeps its transaction open while the backfill runs, then commits. Whether
    the consumer read the range before or after that commit, the writer's queued change applies after the
    chunk (it was not visible when the chunk's batch was read), so D1 ends with the writer's value."""
    pair, url = loaded
    holding = threading.Event()

    def slow_writer():
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE apps SET name = 'written while the chunk was read' WHERE id = 10")
            conn.execute("INSERT INTO apps (id, name) VALUES (150, 'inserted in the chunk range')")
            holding.set()
            time.sleep(1.0)
            conn.commit()

    pair.sql("DELETE FROM apps WHERE id = 150")
    t = threading.Thread(target=slow_writer)
    t.start()
    holding.wait()
    backfill(pair.pg, pair.d1, SCHEMA, tables=["apps"], chunk_size=100)
    t.join()
    apply(pair.pg, pair.d1, SCHEMA)
    pair.assert_in_sync(["apps"])
    (res,) = pair.d1.query("SELECT name FROM apps WHERE id IN (10, 150) ORDER BY id")
    assert [r["name"] for r in res.results] == ["written while the chunk was read", "inserted in the chunk range"]


def test_range_markers_over_the_row_budget_wait_for_later_batches_in_order(loaded):
    """Markers whose rows would overflow a batch are made visible again and read next, before any later
    message: a change enqueued after the markers still lands last."""
    from d1sync_dagster.engine.ranges import enqueue_marker

    pair, _ = loaded
    apps = SCHEMA.table("apps")
    for after, upto in [(None, ["1000"]), (["1000"], ["2000"]), (["2000"], None)]:
        enqueue_marker(pair.pg, apps, after, upto, 1000)
    pair.sql("UPDATE apps SET name = 'changed after the markers' WHERE id IN (5, 1500, 2999)")
    report = apply(pair.pg, pair.d1, SCHEMA, ApplyOptions(max_rows_per_batch=1500))
    assert report.drained and report.dead_lettered == 0
    assert report.batches >= 3  # one marker per batch: 1000 + 1000 rows would pass the budget
    pair.assert_in_sync(["apps"])
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps WHERE name = 'changed after the markers'")
    assert res.results[0]["n"] == 3


def test_a_range_that_cannot_be_read_is_dead_lettered_with_its_reason(loaded):
    from d1sync_dagster.engine.ranges import enqueue_marker

    pair, _ = loaded
    enqueue_marker(pair.pg, SCHEMA.table("apps"), ["not a number"], None, 10)  # the key is a bigint
    pair.sql("INSERT INTO apps (id, name) VALUES (900001, 'after')")
    report = apply(pair.pg, pair.d1, SCHEMA)
    assert report.drained and report.dead_lettered == 1
    (letter,) = pair.dead_letters()
    assert "cannot be read" in letter["error"] and "invalid input syntax for type bigint" in letter["error"]
    (res,) = pair.d1.query("SELECT name FROM apps WHERE id = 900001")
    assert res.results == [{"name": "after"}]  # the rest of the queue applied


def test_chunk_rows_refused_by_conversion_or_by_d1_are_dead_lettered_and_the_rest_lands(loaded):
    """Rows of a range that take the general path: one that does not convert (NaN into REAL), one too large
    for a packed statement, one D1 itself refuses (a CHECK constraint D1's table has and the source has
    not). A trigger change in the same batch lands after the chunk."""
    pair, _ = loaded
    pair.d1.query("DROP TABLE apps")
    pair.d1.query(
        'CREATE TABLE apps ("id" INTEGER NOT NULL, "owner_id" TEXT, "name" TEXT CHECK (name NOT LIKE \'refused%\'), '
        '"is_public" INTEGER, "settings" TEXT, "rating" REAL, "icon" BLOB, "created_at" INTEGER, PRIMARY KEY ("id"))'
    )
    pair.sql("UPDATE apps SET rating = 'NaN' WHERE id = 10")
    pair.sql("UPDATE apps SET name = %s WHERE id = 20", ["y" * 150_000])
    pair.sql("UPDATE apps SET name = 'refused by D1' WHERE id = 30")
    pair.sql("SELECT pgmq.purge_queue('replicate_data')")  # only the range reads see those rows
    pair.sql("INSERT INTO apps (id, name) VALUES (900001, 'a trigger change')")
    report = backfill(pair.pg, pair.d1, SCHEMA, tables=["apps"], chunk_size=1000)
    assert report.apply is not None and report.apply.dead_lettered == 2
    reasons = [letter["error"] for letter in pair.dead_letters()]
    assert sum("D1 refused" in r and "CHECK constraint failed" in r for r in reasons) == 1
    assert sum("BACKFILL of apps, row 9: column 'rating': REAL column got NaN" in r for r in reasons) == 1
    assert all(letter["message"]["type"] == "BACKFILL" for letter in pair.dead_letters())  # the range marker
    (res,) = pair.d1.query("SELECT count(*) AS n, max(length(name)) AS longest FROM apps")
    assert res.results == [{"n": 2999, "longest": 150_000}]
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps WHERE id IN (10, 30)")
    assert res.results == [{"n": 0}]
