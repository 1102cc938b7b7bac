"""The streaming apply follows the queue: changes committed after it started land within a fraction of a
second (woken by the capture triggers' notification), it records only tables that changed, it ends on
time, and where notifications cannot arrive it polls instead."""

import threading
import time

import psycopg

from d1sync_dagster.clients.pgmq import ChangeListener, PgmqClient
from d1sync_dagster.engine.stream import StreamOptions, follow_queue


def d1_count(d1, table="apps"):
    (res,) = d1.query(f"SELECT count(*) AS n FROM {table}")
    return res.results[0]["n"]


def test_changes_written_after_it_started_land_quickly_and_it_ends_on_time(pair, source_db):
    landed_at: dict[int, float] = {}
    written_at: dict[int, float] = {}
    updates = []

    def writer():
        with psycopg.connect(source_db, autocommit=True) as conn:
            time.sleep(0.5)  # the stream is idle on an empty queue by now
            for i in range(1, 6):
                conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'n')", [i])
                written_at[i] = time.monotonic()
                time.sleep(0.3)

    def watch():
        while len(landed_at) < 5 and time.monotonic() < deadline:
            for i in range(1, 6):
                if i not in landed_at and pair.d1.query(f"SELECT 1 FROM apps WHERE id = {i}")[0].results:
                    landed_at[i] = time.monotonic()
            time.sleep(0.01)

    # A poll interval far longer than the test: only a notification can wake the stream in time.
    options = StreamOptions(seconds=4.0, poll_seconds=30.0, record_every_seconds=0.2)
    started = time.monotonic()
    deadline = started + 10
    threads = [threading.Thread(target=writer), threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for landed in follow_queue(pair.pg, pair.d1, pair.schema, options):
        updates.append(landed)
    elapsed = time.monotonic() - started
    for t in threads:
        t.join()
    assert 4.0 <= elapsed < 6.0, elapsed  # ends by itself, on time
    assert sorted(landed_at) == [1, 2, 3, 4, 5]
    lags = [landed_at[i] - written_at[i] for i in landed_at]
    assert max(lags) < 1.0, lags
    assert updates[-1].final and updates[-1].totals.messages == 5 and "notifications" in updates[-1].wake
    recorded = [u for u in updates if u.tables]
    assert recorded and all(set(u.tables) == {"apps"} for u in recorded)  # app_versions never changed
    assert sum(u.tables["apps"].messages for u in recorded) == 5
    assert all(u.tables["apps"].lag_seconds is not None and u.tables["apps"].lag_seconds < 1.0 for u in recorded)


def test_a_stop_ends_it_at_once_and_a_held_lock_skips_it(pair, source_db):
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    *_, last = follow_queue(pair.pg, pair.d1, pair.schema, StreamOptions(seconds=60, poll_seconds=0.2), stop=stop)
    assert last.final and time.monotonic() - started < 3
    with PgmqClient(source_db) as other, other.consumer_lock() as got:
        assert got
        (last,) = list(follow_queue(pair.pg, pair.d1, pair.schema, StreamOptions(seconds=60)))
    assert last.final and "another apply" in (last.totals.skipped or "") and last.following_since is None


def test_a_successor_waits_for_its_predecessor_and_takes_over_the_moment_it_ends(pair, source_db):
    """The successor starts while its predecessor still follows the queue, waits for the lock, and follows
    from the moment the lock is free: a change written at the handover waits no longer than any other."""
    ended: list[float] = []
    followed: list[float] = []

    def predecessor():
        with PgmqClient(source_db) as pg:
            list(follow_queue(pg, pair.d1, pair.schema, StreamOptions(seconds=2.0, poll_seconds=0.2)))
        ended.append(time.time())

    first = threading.Thread(target=predecessor)
    first.start()
    time.sleep(0.8)  # the predecessor holds the lock by now
    options = StreamOptions(seconds=2.0, poll_seconds=0.2, wait_for_lock_seconds=10)
    with PgmqClient(source_db) as pg:
        for landed in follow_queue(pg, pair.d1, pair.schema, options):
            if landed.following_since is not None:
                followed.append(landed.following_since)
                pair.sql("INSERT INTO apps (id, name) VALUES (1, 'after the handover')")
            last = landed
    first.join()
    (since,) = followed
    assert since - ended[0] < 0.5, since - ended[0]  # the lock was taken over at once
    assert last.final and last.totals.messages == 1 and d1_count(pair.d1) == 1


def test_where_notifications_do_not_arrive_it_polls(pair, source_db):
    """Through a transaction pooler (here: a client that knows it is pooled) it polls; changes still land.
    tests/engine/test_pooler.py runs it through a real pgbouncer, where the probe itself finds out."""
    with PgmqClient(source_db) as pg:
        pg.pooled = True  # what a port-6543 URL sets
        listener = ChangeListener(pg, poll_seconds=0.1)
        assert not listener.listening and "pooler" in listener.mode
        listener.close()
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
        updates = list(follow_queue(pg, pair.d1, pair.schema, StreamOptions(seconds=1.5, poll_seconds=0.1)))
    assert "polling every 0.1s" in updates[-1].wake
    assert d1_count(pair.d1) == 50 and updates[-1].totals.messages == 50
