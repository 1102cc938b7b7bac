"""Through a transaction pooler (Debian's pgbouncer 1.18 in transaction mode, on a port of its own, not 6543):
the single-consumer lock holds, no lock leaks when a consumer dies, no prepared statement breaks, concurrent
applies under a writer converge, backfill and reconcile work; a pooler in statement mode is refused by name.

Each test gets a pgbouncer of its own, stopped before its database is dropped: when Postgres ends an idle
server connection (DROP DATABASE ... WITH (FORCE) does), pgbouncer 1.18 logs "got packet 'E' from server when
not linked", and a shared pgbouncer then stalls the next server login it makes on that connection's slot."""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.doctor import diagnose
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT, free_port
from tests.engine.test_doctor import Borrowed
from tests.helpers import Pair

SCHEMA = load_schema(ROOT / "schema.json")


def _pgbouncer_exe() -> str:
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return exe


@contextmanager
def run_pgbouncer(server_url: str, *, pool_mode: str = "transaction", pool_size: int = 3) -> Iterator[str]:
    """pgbouncer in front of `server_url`'s Postgres; yields the same URL through it. A small server pool,
    so that consecutive statements of one client really run on different server connections."""
    exe = _pgbouncer_exe()
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    host, port = info.get("host") or "127.0.0.1", info.get("port") or "5432"
    if host.startswith("/"):
        pytest.skip("the test Postgres listens on a unix socket only")
    work = Path(tempfile.mkdtemp(prefix="d1sync-pgbouncer-"))
    work.chmod(0o777)
    listen = free_port()
    (work / "users.txt").write_text('"postgres" ""\n')
    (work / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={host} port={port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {work}/users.txt
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
admin_users = postgres
logfile = {work}/pgbouncer.log
"""
    )
    for f in work.iterdir():
        f.chmod(0o666)
    argv = [exe, str(work / "pgbouncer.ini")]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "postgres"]  # pgbouncer refuses to run as root
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = psycopg.conninfo.make_conninfo(**(info | {"host": "127.0.0.1", "port": str(listen)}))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = proc.stderr.read() if proc.stderr and proc.poll() is not None else "no answer"
                    raise AssertionError(f"pgbouncer did not start: {why}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()  # its shutdown waits for clients; nothing of it needs to be kept
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def pooled_pair(source_db, d1_local):
    """The example tables set up through pgbouncer in transaction mode: (pair, the pooled URL)."""
    with run_pgbouncer(source_db) as url, PgmqClient(url) as pg:
        setup(pg, d1_local, SCHEMA)
        yield Pair(pg, d1_local, SCHEMA), url


def test_the_consumer_lock_excludes_a_second_consumer_through_the_pooler(pooled_pair):
    pair, url = pooled_pair
    with PgmqClient(url) as a, PgmqClient(url) as b:
        with a.consumer_lock() as got_a:
            assert got_a
            for _ in range(5):  # whatever server connection b's statements land on
                with b.consumer_lock() as got_b:
                    assert not got_b
            a.check_consumer_lock()
        with b.consumer_lock() as got_b:
            assert got_b  # released with a's transaction, on its own server connection


def test_a_consumer_killed_while_holding_the_lock_leaks_nothing(pooled_pair):
    pair, url = pooled_pair
    code = (
        "import sys, time\n"
        "from d1sync_dagster.clients.pgmq import PgmqClient\n"
        "with PgmqClient(sys.argv[1]) as pg, pg.consumer_lock() as got:\n"
        "    print('HELD' if got else 'BUSY', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        with PgmqClient(url) as other, other.consumer_lock() as got:
            assert not got
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while True:
        with PgmqClient(url) as other, other.consumer_lock() as got:
            if got:
                break
        assert time.monotonic() < deadline, "the dead consumer's lock was never released"
        time.sleep(0.2)
    report = pair.apply()  # and an apply is not told "another apply is running"
    assert report.skipped is None


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_concurrent_applies_and_a_writer_through_the_pooler_converge(pooled_pair, source_db, seed):
    """Three consumers race for the queue while a writer inserts, updates and deletes (visibility timeout 0:
    a second consumer inside the lock would read the same messages at once). No prepared-statement error, no
    lock error, no drift."""
    pair, url = pooled_pair
    rng = random.Random(seed)
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = {"worked": 0, "skipped": 0}

    def writer():
        try:
            with psycopg.connect(source_db, autocommit=True) as conn:
                for i in range(300):
                    k = rng.randint(1, 150)
                    if i % 7 == 0:
                        conn.execute("DELETE FROM apps WHERE id = %s", [k])
                    else:
                        conn.execute(
                            "INSERT INTO apps (id, name) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = %s",
                            [k, f"v{i}", f"v{i}"],
                        )
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    def consumer():
        try:
            with PgmqClient(url) as pg:
                while not stop.is_set():
                    report = apply(pg, pair.d1, SCHEMA, ApplyOptions(batch_size=7, vt_seconds=0))
                    runs["skipped" if report.skipped else "worked"] += 1
        except BaseException as e:  # a prepared-statement or lock error would land here
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=consumer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert runs["worked"] > 0 and runs["skipped"] > 0  # the consumers did meet each other
    report = pair.apply()
    assert report.dead_lettered == 0 and pair.dead_letters() == []
    pair.assert_in_sync()


def test_a_lost_lock_stops_the_run_before_anything_is_deleted(pooled_pair):
    """The lock's transaction is ended from outside (a timeout, a pooler restart, an admin) between a batch's
    D1 commit and its delete: the run stops with the reason, the messages stay queued, the next run converges."""
    pair, url = pooled_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
    depth = pair.queue_depth()

    def end_the_lock(_ids):
        ((pid, _app, _since),) = pair.pg.lock_holders()
        pair.sql("SELECT pg_terminate_backend(%s)", [pid])

    with PgmqClient(url) as pg, pytest.raises(QueueError, match="single-consumer lock was lost"):
        apply(pg, pair.d1, SCHEMA, ApplyOptions(batch_size=10), after_d1_commit=end_the_lock)
    assert pair.queue_depth() == depth
    assert pair.apply().messages == depth
    pair.assert_in_sync()


def test_backfill_and_reconcile_through_the_pooler(pooled_pair):
    pair, url = pooled_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' || g FROM generate_series(1, 2000) g")
    pair.pg.purge()  # as if the rows were there before capture: only a backfill brings them
    with PgmqClient(url) as pg:
        backfill(pg, pair.d1, SCHEMA, tables=["apps"], chunk_size=300)
        pair.assert_in_sync(["apps"])
        pair.d1.query("DELETE FROM apps WHERE id % 97 = 0")
        drift = reconcile(pg, pair.d1, SCHEMA, tables=["apps"], repair_drift=True)
        assert not drift.in_sync
    pair.apply()
    pair.assert_in_sync(["apps"])


def test_a_pooler_in_statement_mode_is_refused_by_name(source_db, d1_local):
    with run_pgbouncer(source_db, pool_mode="statement") as url:
        with PgmqClient(url) as pg, pytest.raises(QueueError) as e:
            apply(pg, d1_local, SCHEMA)
        dx = diagnose(lambda: PgmqClient(url), lambda: Borrowed(d1_local), SCHEMA)
    assert "statement mode" in str(e.value) and "transaction mode" in str(e.value)
    (lock,) = [f for f in dx.findings if f.check == "consumer lock"]
    assert lock.level == "fail" and "statement mode" in lock.detail and dx.exit_code == 1


def test_doctor_through_the_transaction_pooler_finds_nothing_wrong(pooled_pair):
    pair, url = pooled_pair
    dx = diagnose(lambda: PgmqClient(url), lambda: Borrowed(pair.d1), SCHEMA)
    assert dx.exit_code == 0, dx.table()


def test_the_streaming_apply_finds_out_that_notifications_do_not_arrive_and_polls(pooled_pair):
    """pgbouncer on 6432 is not recognised by its port: the listener's probe finds that no notification
    arrives through it, and the stream polls; changes written meanwhile land."""
    from d1sync_dagster.clients.pgmq import ChangeListener
    from d1sync_dagster.engine.stream import StreamOptions, follow_queue

    p, _url = pooled_pair
    assert not p.pg.pooled  # not port 6543: only the probe can tell
    listener = ChangeListener(p.pg, poll_seconds=0.2, probe_seconds=1.0)
    assert not listener.listening and "did not arrive" in listener.mode
    listener.close()
    p.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
    updates = list(follow_queue(p.pg, p.d1, p.schema, StreamOptions(seconds=3, poll_seconds=0.2)))
    assert "polling every 0.2s" in updates[-1].wake and updates[-1].totals.messages == 30
    (res,) = p.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 30}]
