"""Through a transaction pooler (Debian's pgbouncer 1.18 in transaction mode, on its own port): the
single-consumer lock holds, no lock leaks when a consumer dies, no prepared statement breaks, and
concurrent applies under a writer converge."""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import QueueError
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT, free_port
from tests.helpers import Pair

SCHEMA = load_schema(ROOT / "schema.json")


@pytest.fixture(scope="session")
def pgbouncer(pg_admin_url):
    """pgbouncer in transaction mode in front of the test Postgres, with a small server pool so that
    consecutive statements of one client really run on different server connections."""
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
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
pool_mode = transaction
default_pool_size = 3
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
logfile = {work}/pgbouncer.log
"""
    )
    for f in work.iterdir():
        f.chmod(0o666)
    argv = [exe, str(work / "pgbouncer.ini")]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "postgres"]  # pgbouncer refuses to run as root
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{listen}/postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = proc.stderr.read() if proc.stderr and proc.poll() is not None else "no answer"
                    raise AssertionError(f"pgbouncer did not start: {why}") from None
                time.sleep(0.2)
        yield listen
    finally:
        proc.kill()  # its shutdown waits for clients; nothing of it needs to be kept
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def pooled(url: str, port: int) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url) | {"host": "127.0.0.1", "port": str(port)}
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture
def pooled_pair(source_db, d1_local, pgbouncer):
    url = pooled(source_db, pgbouncer)
    with PgmqClient(url) as pg:
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


def test_concurrent_applies_and_a_writer_through_the_pooler_converge(pooled_pair, source_db):
    pair, url = pooled_pair
    rng = random.Random(7)
    stop = threading.Event()
    errors: list[BaseException] = []

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
                    apply(pg, pair.d1, SCHEMA, ApplyOptions(batch_size=7, vt_seconds=0))
        except BaseException as e:  # a prepared-statement or lock error would land here
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=consumer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    report = pair.apply()
    assert report.dead_lettered == 0 and pair.dead_letters() == []
    pair.assert_in_sync()


def test_a_lost_lock_stops_the_run_before_anything_is_deleted(pooled_pair):
    pair, url = pooled_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
    depth = pair.queue_depth()
    with PgmqClient(url) as pg, pg.consumer_lock() as got:
        assert got
        # The lock's transaction is ended from outside (an idle timeout, a pooler restart, an admin).
        backend = pg._lock_holder.execute("SELECT pg_backend_pid()")[0][0]
        pair.sql("SELECT pg_terminate_backend(%s)", [backend])
        with pytest.raises(QueueError, match="single-consumer lock was lost"):
            pg.check_consumer_lock()
    assert pair.queue_depth() == depth
