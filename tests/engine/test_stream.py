"""The streaming apply follows the queue: changes committed after it started land within a fraction of a
second (woken by the capture triggers' notification), it records only tables that changed, it ends on
time, and where notifications cannot arrive it polls instead."""

import threading
import time
from contextlib import contextmanager

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


# --- Faults waited out inside the stream, and a standby that takes over from a dead run (issue 26). ---


def _follow(pg, pair, options, stop, out, errors):
    try:
        for landed in follow_queue(pg, pair.d1, pair.schema, options, stop=stop):
            out.append(landed)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@contextmanager
def _streaming(pair, source_db, **options):
    """A stream following the queue on a thread of its own (on its own connection) until the block ends;
    yields (what landed, the errors it raised, the thread), once it follows."""
    stop, out, errors = threading.Event(), [], []
    with PgmqClient(source_db) as pg:
        opts = StreamOptions(**({"seconds": 60, "poll_seconds": 0.2, "record_every_seconds": 0.2} | options))
        t = threading.Thread(target=_follow, args=(pg, pair, opts, stop, out, errors))
        t.start()
        try:
            yield out, errors, t
        finally:
            stop.set()
            t.join()


def _wait_for(pred, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_terminated_postgres_backends_are_waited_out_inside_the_stream(pair, source_db):
    """Every d1sync connection is terminated (a Supabase restart, a pooler recycling its servers): the stream
    reconnects and goes on, in the same run; nothing is lost and nothing dead-lettered."""
    with _streaming(pair, source_db) as (out, errors, t):
        assert _wait_for(lambda: any(x.following_since for x in out))
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'before' FROM generate_series(1, 20) g")
        assert _wait_for(lambda: d1_count(pair.d1) == 20)
        with psycopg.connect(source_db, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend' AND pid <> %s",
                [pair.pg.conn.info.backend_pid],
            ).fetchone()[0]
        assert killed >= 2  # the stream's reader and its lock's connection, at least
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'after' FROM generate_series(21, 60) g")
        assert _wait_for(lambda: d1_count(pair.d1) == 60), "the stream did not come back"
        assert not errors and t.is_alive()
    assert not errors, errors
    assert out[-1].final and out[-1].totals.messages >= 60
    pair.assert_in_sync()
    assert pair.dead_letters() == []


def test_a_locked_d1_is_waited_out_inside_the_stream(local_pair, source_db, tmp_path):
    """Another process holds the D1 file's write lock past the busy timeout: the apply fails with a temporary
    D1Error, the stream backs off and tries again, and once the lock is gone every change lands. (A failed
    batch also ends the reading: following an otherwise quiet queue, it used to stall the stream.)"""
    import sqlite3

    pair = local_pair
    path = pair.d1.path
    pair.d1._conn.execute("PRAGMA busy_timeout=300")  # the test's lock outlasts it without waiting 10 s
    with _streaming(pair, source_db) as (out, errors, t):
        assert _wait_for(lambda: any(x.following_since for x in out))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
        time.sleep(2.0)  # several tries fail meanwhile
        assert t.is_alive() and not errors
        blocker.execute("ROLLBACK")
        blocker.close()
        assert _wait_for(lambda: d1_count(pair.d1) == 30), "the stream did not come back"
    assert not errors, errors
    pair.assert_in_sync()
    assert pair.dead_letters() == []


STREAM_CHILD = """
import sys, time
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.stream import StreamOptions, follow_queue
from d1sync_dagster.schema import load_schema
url, path, schema = sys.argv[1:4]
with PgmqClient(url) as pg:
    options = StreamOptions(seconds=600, poll_seconds=0.2)
    for landed in follow_queue(pg, LocalD1Client(path), load_schema(schema), options):
        if landed.following_since:
            print("following", flush=True)
"""


def test_a_standby_takes_over_the_moment_the_running_stream_is_killed(local_pair, source_db, tmp_path):
    """kill -9 of the process that follows the queue: its connection, and the consumer lock, go with it; the
    standby, waiting on the lock (and holding the standby lock meanwhile), follows at once. Nothing is lost."""
    pair = local_pair
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    schema_file = ROOT / "schema.json"  # the pair's schema
    child = subprocess.Popen(
        [sys.executable, "-c", STREAM_CHILD, source_db, str(pair.d1.path), str(schema_file)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    stop, out, errors = threading.Event(), [], []
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "following"
        with PgmqClient(source_db) as pg:
            options = StreamOptions(seconds=60, poll_seconds=0.2, record_every_seconds=0.2, wait_for_lock_seconds=60)
            t = threading.Thread(target=_follow, args=(pg, pair, options, stop, out, errors))
            t.start()
            try:
                assert _wait_for(lambda: pair.pg.lock_holders(standby=True) != [])  # standing by, alive
                pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 10) g")
                assert _wait_for(lambda: d1_count(pair.d1) == 10)  # the child applies them
                assert not any(x.following_since for x in out)
                os.kill(child.pid, signal.SIGKILL)
                killed = time.monotonic()
                child.wait()
                pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(11, 40) g")
                assert _wait_for(lambda: d1_count(pair.d1) == 40)
                took = time.monotonic() - killed
                assert any(x.following_since for x in out) and pair.pg.lock_holders(standby=True) == []
                print(f"standby took over and applied within {took:.2f}s of the kill")
            finally:
                stop.set()
                t.join()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not errors, errors
    pair.assert_in_sync()


def test_a_read_only_d1_is_waited_out_inside_the_stream(local_pair, source_db):
    """D1 answers as a read-only database does (SQLITE_READONLY) for a while: temporary, never the data's fault;
    the stream backs off and goes on in the same run, and nothing is dead-lettered."""
    pair = local_pair
    with _streaming(pair, source_db) as (out, errors, t):
        assert _wait_for(lambda: any(x.following_since for x in out))
        pair.d1._conn.execute("PRAGMA query_only = ON")
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
        # Several tries are refused meanwhile. The run keeps the queue's lock through each wait, so a standby
        # does not take the queue over from a run that only waits out a fault (its start-up would add to it).
        free = 0
        with PgmqClient(source_db) as watcher:
            for _ in range(40):
                free += not watcher.lock_holders()
                time.sleep(0.05)
        assert free <= 2, f"the lock was free in {free} of 40 looks"
        assert t.is_alive() and not errors
        pair.d1._conn.execute("PRAGMA query_only = OFF")
        assert _wait_for(lambda: d1_count(pair.d1) == 30), "the stream did not come back"
    assert not errors, errors
    pair.assert_in_sync()
    assert pair.dead_letters() == []
