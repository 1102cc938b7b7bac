"""Cloudflare's D1 errors, as the real API words them, injected through the HTTP stand-in: temporary ones
leave the queue intact and dead-letter nothing, SQL errors still isolate the change at fault, a lockout is
waited out or deferred without a storm of requests."""

import os
import time

import httpx
import pytest

from d1sync_dagster.clients.d1 import RetryPolicy
from d1sync_dagster.clients.d1_errors import classify
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.setup import ensure_schema, setup
from d1sync_dagster.errors import D1Error
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT
from tests.helpers import Pair

SCHEMA = load_schema(ROOT / "schema.json")

#: Cloudflare's texts (developers.cloudflare.com/d1/observability/debug-d1), with the status they come with.
TEMPORARY = [
    (500, 7500, "internal error; reference = 5d3c0e2b1a9f4c7e8d6b2a1f"),
    (400, 7500, "Network connection lost."),
    (400, 7500, "D1 DB reset because its code was updated."),
    (400, 7500, "Internal error while starting up D1 DB storage caused object to be reset."),
    (400, 7500, "Cannot resolve D1 DB due to transient issue on remote node."),
]
OVERLOADED = [
    (400, 7500, "D1 DB is overloaded. Requests queued for too long."),
    (400, 7500, "D1 DB exceeded its CPU time limit and was reset."),
    (400, 7500, "D1 DB's isolate exceeded its memory limit and was reset."),
]
QUOTA = [(400, 7500, "Exceeded the daily limit of rows written for this account. Limits reset at 00:00 UTC.")]
SQL = [
    (400, 7500, "UNIQUE constraint failed: apps.id: SQLITE_CONSTRAINT"),
    (400, 7500, "string or blob too big: SQLITE_TOOBIG"),
    (400, 7500, 'near "INSERTZ": syntax error at offset 0: SQLITE_ERROR'),
]


def answer(status, code, message):
    return {
        "status": status,
        "body": {"result": None, "success": False, "errors": [{"code": code, "message": message}]},
    }


def refuse_in_d1(pair, check):
    """D1's `apps` drifted from schema.json: a CHECK constraint the source does not have, rows copied over."""
    pair.apply()
    pair.d1.query("ALTER TABLE apps RENAME TO apps_old")
    pair.d1.query(
        'CREATE TABLE apps ("id" INTEGER NOT NULL, "owner_id" TEXT, "name" TEXT, "is_public" INTEGER, '
        f'"settings" TEXT, "rating" REAL, "icon" BLOB, "created_at" INTEGER, PRIMARY KEY ("id"), CHECK ({check}))'
    )
    pair.d1.query("INSERT INTO apps SELECT * FROM apps_old")
    pair.d1.query("DROP TABLE apps_old")


@pytest.mark.parametrize(
    "cases, kind", [(TEMPORARY, "temporary"), (OVERLOADED, "overloaded"), (QUOTA, "quota"), (SQL, "sql")]
)
def test_each_answer_is_classified_by_what_it_means(cases, kind):
    for status, code, message in cases:
        assert classify(status, code, message) == kind, message
    assert classify(403, 10000, "Authentication error") == "auth" == classify(401, 10000, "Authentication error")
    assert classify(429, 971, "Please wait and consider throttling your request speed") == "rate_limited"
    assert classify(400, 7500, "something new that D1 says one day") == "temporary"  # never dead-lettered


@pytest.fixture
def http_pair(source_db, d1_standin):
    d1_standin.reset()
    sleeps: list[float] = []
    d1 = d1_standin.client(sleep=sleeps.append, retry=RetryPolicy(attempts=3, base_delay=0.01, max_wait=5))
    with PgmqClient(source_db) as pg:
        setup(pg, d1, SCHEMA)
        pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 120) g")
        yield Pair(pg, d1, SCHEMA), d1_standin, sleeps
    d1_standin.ratelimit(None)
    d1.close()


@pytest.mark.parametrize("status, code, message", TEMPORARY + QUOTA, ids=lambda v: str(v)[:30])
def test_a_temporary_failure_keeps_the_queue_and_dead_letters_nothing(http_pair, status, code, message):
    pair, standin, _ = http_pair
    depth = pair.queue_depth()
    standin.inject(*[answer(status, code, message)] * 3)  # more than the client's retries
    with pytest.raises(D1Error) as e:
        pair.apply(batch_size=50, vt_seconds=0)
    assert e.value.kind in ("temporary", "quota") and not e.value.bisectable
    assert pair.queue_depth() == depth and pair.dead_letters() == []
    if e.value.kind == "quota":
        assert "limit" in str(e.value) and "changes stay queued" in str(e.value)
    standin.inject(clear=True)
    assert pair.apply().dead_lettered == 0
    pair.assert_in_sync()


@pytest.mark.parametrize("status, code, message", OVERLOADED, ids=lambda v: str(v)[:30])
def test_an_overloaded_d1_gets_smaller_requests_and_nothing_is_lost(http_pair, status, code, message):
    pair, standin, _ = http_pair
    standin.inject(*[answer(status, code, message)] * 3)  # the first request fails after every retry
    report = pair.apply()
    assert report.drained and report.dead_lettered == 0 and report.requests > 1
    pair.assert_in_sync()


def test_a_failed_result_inside_a_200_is_an_error(http_pair):
    pair, standin, _ = http_pair
    body = {"success": True, "errors": [], "result": [{"success": False, "error": "Network connection lost."}]}
    standin.inject(*[{"status": 200, "body": body}] * 3)
    with pytest.raises(D1Error, match="failed result") as e:
        pair.apply(vt_seconds=0)
    assert e.value.kind == "temporary" and pair.dead_letters() == []


def test_sql_errors_still_isolate_the_change_at_fault(http_pair):
    pair, _, _ = http_pair
    refuse_in_d1(pair, "NOT (id = 13 AND name = 'changed')")
    for i in range(1, 41):  # forty transactions of one change each
        pair.sql("UPDATE apps SET name = 'changed' WHERE id = %s", [i])
    report = pair.apply()
    assert report.dead_lettered == 1
    (letter,) = pair.dead_letters()
    assert letter["table"] == "apps" and "CHECK constraint failed" in letter["error"]
    assert letter["message"]["record"]["id"] == 13


def test_a_transaction_with_a_refused_change_is_dead_lettered_whole_and_nothing_of_it_is_visible(http_pair):
    pair, _, _ = http_pair
    refuse_in_d1(pair, "NOT (id = 13 AND name = 'changed')")
    pair.sql("UPDATE apps SET name = 'other' WHERE id = 50")  # a transaction before, and one after
    pair.sql("UPDATE apps SET name = 'changed' WHERE id BETWEEN 1 AND 40")
    pair.sql("UPDATE apps SET name = 'after' WHERE id = 51")
    report = pair.apply()
    assert report.dead_lettered == 40 and pair.queue_depth() == 0
    letters = pair.dead_letters()
    assert {m["message"]["record"]["id"] for m in letters} == set(range(1, 41))
    assert all("its transaction" in m["error"] and "CHECK constraint failed" in m["error"] for m in letters)
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps WHERE name = 'changed'")
    assert res.results == [{"n": 0}]  # none of the transaction's 39 acceptable changes is visible
    (res,) = pair.d1.query("SELECT name FROM apps WHERE id IN (50, 51) ORDER BY id")
    assert [r["name"] for r in res.results] == ["other", "after"]


def test_bisection_stops_at_its_request_budget_and_the_next_runs_finish(http_pair):
    pair, _, _ = http_pair
    refuse_in_d1(pair, "NOT (id % 10 = 3 AND name = 'changed')")
    for i in range(1, 101):  # a hundred transactions, ten of which D1 refuses
        pair.sql("UPDATE apps SET name = 'changed' WHERE id = %s", [i])
    with pytest.raises(D1Error, match="max_bisect_requests"):
        pair.apply(max_bisect_requests=8)
    # The messages settled before the budget ran out are gone (applied or dead-lettered), the rest queued.
    assert 0 < pair.queue_depth() < 100 and len(pair.dead_letters()) < 10
    for _ in range(20):  # each run settles more, until the batch is through
        try:
            pair.apply(max_bisect_requests=8)
            break
        except D1Error:
            continue
    assert len(pair.dead_letters()) == 10 and pair.queue_depth() == 0


def test_a_lockout_that_ends_soon_is_waited_out_once(http_pair):
    pair, standin, _ = http_pair
    pair.apply()
    standin.ratelimit(50, lockout_seconds=2)
    # wrangler or the dashboard of the same user spends the shared budget, without pacing itself
    url = f"{standin.base_url}/client/v4/accounts/{standin.account_id}/d1/database/{standin.database_id}/query"
    auth = {"authorization": f"Bearer {standin.api_token}"}
    codes = [httpx.post(url, json={"sql": "SELECT 1"}, headers=auth).status_code for _ in range(51)]
    assert codes[-1] == 429
    pair.sql("UPDATE apps SET name = 'later' WHERE id <= 60")
    waits = []

    def sleep(s):
        waits.append(s)
        time.sleep(s)

    pair.d1._sleep = sleep  # the lockout is real time on the stand-in
    before = pair.d1.requests
    report = pair.apply(batch_size=20)
    assert report.drained and report.dead_lettered == 0
    assert len(waits) == 1 and 1 <= waits[0] <= 3  # one wait, for the lockout's Retry-After
    assert pair.d1.requests - before == report.requests + 1  # the one refused call, no storm
    pair.assert_in_sync()


def test_a_long_lockout_stops_the_run_with_a_time_and_one_request(http_pair):
    pair, standin, sleeps = http_pair
    pair.apply()
    standin.ratelimit(0, lockout_seconds=300)
    pair.sql("UPDATE apps SET name = 'later' WHERE id <= 60")
    depth = pair.queue_depth()
    before = pair.d1.requests
    with pytest.raises(D1Error) as e:
        pair.apply(vt_seconds=0)
    assert e.value.kind == "rate_limited" and e.value.retry_at is not None
    assert 290 < e.value.retry_at - time.time() <= 301
    assert pair.d1.requests - before == 1 and sleeps == []  # no storm: one refused call, no waiting
    assert pair.queue_depth() == depth and pair.dead_letters() == []


def test_the_budget_headers_pace_requests_before_a_lockout(http_pair):
    pair, standin, _ = http_pair
    pair.apply()
    standin.ratelimit(6, window_seconds=2, lockout_seconds=300)
    pair.d1._sleep = time.sleep
    for _ in range(4):
        pair.d1.query("SELECT 1")
    assert pair.d1.budget.remaining is not None and pair.d1.budget.remaining <= 2
    started = time.monotonic()
    pair.d1.query("SELECT 1")  # would be the sixth of six: waits for the window instead
    assert time.monotonic() - started >= 0.5
    for _ in range(3):
        pair.d1.query("SELECT 1")  # a fresh window: no 429, no lockout


def test_a_temporary_failure_while_checking_the_schema_is_not_taken_for_a_new_database(http_pair):
    pair, standin, _ = http_pair
    standin.inject(*[answer(400, 7500, "Network connection lost.")] * 3)
    before = pair.d1.requests
    with pytest.raises(D1Error, match="Network connection lost"):
        ensure_schema(pair.pg, pair.d1, SCHEMA)
    assert pair.d1.requests - before == 3  # the meta read and its retries, no setup after it


def test_nuke_refuses_without_a_restore_point_unless_accepted(http_pair):
    pair, standin, _ = http_pair
    pair.apply()

    def bookmark_fails():
        raise D1Error("D1 HTTP API returned 500, code 7500: internal error", kind="temporary")

    pair.d1.bookmark = bookmark_fails  # the Time Travel call fails; the nuke must not go ahead silently
    with pytest.raises(D1Error, match="no restore point could be taken before the nuke.*nothing was dropped"):
        nuke(pair.pg, pair.d1, SCHEMA, confirm=True)
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 120}]
    report = nuke(pair.pg, pair.d1, SCHEMA, confirm=True, accept_no_restore_point=True)
    assert report.bookmark is None
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 0}]


def test_a_403_is_an_auth_error_with_the_same_hint_as_a_401(http_pair):
    pair, standin, _ = http_pair
    depth = pair.queue_depth()
    standin.inject(answer(403, 10000, "Authentication error"))
    with pytest.raises(D1Error, match="403.*CLOUDFLARE_API_TOKEN") as e:
        pair.apply(vt_seconds=0)
    assert e.value.kind == "auth" and not e.value.retryable
    assert pair.queue_depth() == depth and pair.dead_letters() == []


def test_a_413_request_too_large_is_split_and_nothing_is_dead_lettered(http_pair):
    pair, standin, _ = http_pair
    standin.inject(answer(413, 10413, "Request entity too large"))
    report = pair.apply()
    assert report.drained and report.dead_lettered == 0
    pair.assert_in_sync()


def test_a_read_only_or_locked_local_d1_is_temporary_never_dead_lettered(source_db, tmp_path):
    import sqlite3

    from d1sync_dagster.clients.d1_local import LocalD1Client
    from tests.helpers import Pair

    d1 = LocalD1Client(tmp_path / "d1.sqlite")
    with PgmqClient(source_db) as pg:
        setup(pg, d1, SCHEMA)
        pair = Pair(pg, d1, SCHEMA)
        pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
        d1._conn.execute("PRAGMA query_only = ON")  # the database answers as a read-only one does
        with pytest.raises(D1Error) as e:
            pair.apply()
        assert e.value.kind == "temporary" and "SQLITE_READONLY" in str(e.value)
        assert pair.dead_letters() == [] and pair.queue_depth() == 50
        d1._conn.execute("PRAGMA query_only = OFF")
        d1._conn.execute("PRAGMA busy_timeout = 100")
        other = sqlite3.connect(tmp_path / "d1.sqlite", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the file
        with pytest.raises(D1Error) as e:
            pair.apply()
        assert e.value.kind == "temporary" and "locked" in str(e.value)
        assert pair.dead_letters() == [] and pair.queue_depth() == 50
        other.execute("ROLLBACK")
        other.close()
        assert pair.apply().drained
        pair.assert_in_sync()
    d1.close()


def test_a_write_the_disk_refuses_at_commit_is_temporary_never_a_raw_sqlite_error(source_db, tmp_path):
    """The file and its write-ahead log made immutable (`chattr +i`, as root on ext4: a disk gone read-only,
    which binds root too): SQLite fails the COMMIT with an I/O error. That is D1's temporary error, not a
    raw `sqlite3.OperationalError` that would end a streaming run; nothing is dead-lettered, and the next
    apply, once the file is writable, lands everything."""
    import subprocess

    from d1sync_dagster.clients.d1_local import LocalD1Client
    from tests.helpers import Pair

    path = tmp_path / "d1.sqlite"
    d1 = LocalD1Client(path)
    files = [str(path), str(path) + "-wal"]
    with PgmqClient(source_db) as pg:
        setup(pg, d1, SCHEMA)
        pair = Pair(pg, d1, SCHEMA)
        pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            with pytest.raises(D1Error) as e:
                pair.apply()
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        assert e.value.kind == "temporary" and "SQLITE_IOERR" in str(e.value)
        assert pair.dead_letters() == [] and pair.queue_depth() == 50
        assert pair.apply().drained
        pair.assert_in_sync()
    d1.close()


def test_a_d1_file_opened_while_the_disk_was_read_only_is_opened_again_once_it_is_writable(tmp_path):
    """SQLite opens a file it cannot write read-only, and the connection stays so after the file is writable
    again: a run started during the spell would refuse every write for the rest of its life (seen in the daemon
    soak: the run held the queue and applied nothing). The client opens the file again after such an answer."""
    import subprocess

    from d1sync_dagster.clients.d1_local import LocalD1Client
    from d1sync_dagster.core.statements import Statement

    path = tmp_path / "d1.sqlite"
    first = LocalD1Client(path)
    first.batch([Statement("CREATE TABLE t (x INTEGER)", ())])
    first.close()
    files = [str(path), str(path) + "-wal"]
    subprocess.run(["chattr", "+i", *[f for f in files if os.path.exists(f)]], check=True)
    try:
        d1 = LocalD1Client(path)  # opened during the spell
        with pytest.raises(D1Error) as e:
            d1.batch([Statement("INSERT INTO t VALUES (1)", ())])
        assert e.value.kind == "temporary" and "SQLITE_READONLY" in str(e.value)
    finally:
        subprocess.run(["chattr", "-i", *[f for f in files if os.path.exists(f)]], check=True)
    d1.batch([Statement("INSERT INTO t VALUES (2)", ())])
    assert d1.query("SELECT count(*) AS n FROM t")[0].results == [{"n": 1}]
    # `PRAGMA query_only` (how the tests make a connection answer as a read-only database does) is left alone.
    d1._conn.execute("PRAGMA query_only = ON")
    with pytest.raises(D1Error):
        d1.batch([Statement("INSERT INTO t VALUES (3)", ())])
    with pytest.raises(D1Error):
        d1.batch([Statement("INSERT INTO t VALUES (3)", ())])
    d1.close()


def test_a_read_only_answer_of_the_http_api_is_temporary():
    assert classify(400, 7500, "attempt to write a readonly database: SQLITE_READONLY") == "temporary"


def test_a_comparison_spends_half_of_the_budget_left_and_an_apply_is_not_slowed(http_pair):
    """verify/reconcile read a table in many requests: paced over the window, they spend at most half of what
    the API's Ratelimit header says is left, so the apply sharing the token keeps the rest."""
    from d1sync_dagster.engine.reconcile import reconcile

    pair, standin, _ = http_pair
    pair.apply()  # the fixture's 120 rows
    standin.ratelimit(120, window_seconds=4, lockout_seconds=300)
    waited: list[float] = []

    def sleep(seconds: float) -> None:
        waited.append(seconds)
        time.sleep(seconds)

    pair.d1._sleep = sleep
    pair.d1.query("SELECT 1")  # the first answer brings the headers
    before = pair.d1.requests
    report = reconcile(pair.pg, pair.d1, SCHEMA, tables=["apps"], chunk_size=10)
    sent = pair.d1.requests - before
    assert report.in_sync and sent >= 12
    # Spread over the window, not sent at once: about window / (half of the ~118 left) = 0.07 s apart.
    assert len(waited) >= sent - 3 and all(0.03 < w < 0.2 for w in waited), waited
    assert pair.d1.share == 1.0  # and only while comparing
    waited.clear()
    pair.sql("UPDATE apps SET name = 'm' WHERE id <= 100")
    pair.apply(batch_size=10)
    assert waited == []  # the apply itself is not paced while the budget lasts


def test_the_stream_paces_its_requests_over_the_apis_window(http_pair, source_db):
    """Many small transactions (one row each, 100 a second): paced over the API's window, the streaming apply
    sends a request every window / (0.8 of what is left), each carrying what arrived meanwhile, instead of a
    request per commit that spends the budget in a burst and then waits the window out."""
    import threading

    import psycopg

    from d1sync_dagster.engine.stream import StreamOptions, follow_queue

    pair, standin, _ = http_pair
    pair.apply()
    standin.ratelimit(120, window_seconds=30, lockout_seconds=300)
    pair.d1._sleep = time.sleep
    pair.d1.query("SELECT 1")  # the first answer brings the headers
    stop, done = threading.Event(), threading.Event()

    def write():
        with psycopg.connect(source_db, autocommit=True) as conn:
            for i in range(1000, 1300):
                conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'n')", [i])
                time.sleep(0.01)
        done.set()

    before = pair.d1.requests
    w = threading.Thread(target=write)
    with PgmqClient(source_db) as pg:
        options = StreamOptions(seconds=30, poll_seconds=0.2, record_every_seconds=0.2)
        for landed in follow_queue(pg, pair.d1, SCHEMA, options, stop=stop):
            if landed.following_since and not w.is_alive() and not done.is_set():
                w.start()
            if done.is_set() and pair.queue_depth() == 0:
                stop.set()
    sent = pair.d1.requests - before
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 420}] and pair.dead_letters() == []
    # About 0.33 s apart over the writer's 3-4 s: a dozen requests for 300 commits, far from one each.
    assert sent <= 30, sent
