"""Read-your-writes: the position D1 records with each commit decides exactly, for any Postgres transaction
id, whether its effects are in D1 (also while an older transaction is still open), in Python and in the
TypeScript module run in workerd through the D1 Sessions API."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d1sync_dagster.core.txns import Snapshot, TxnRange, applied, groups, partial, valid_cut
from d1sync_dagster.engine.position import applied as applied_in
from d1sync_dagster.engine.position import freshness, wait_for_applied
from tests.conftest import STANDIN, free_port


def txid(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0])


def test_a_committed_write_is_applied_once_apply_ran_and_an_open_older_one_hides_nothing(pair, source_db):
    with psycopg.connect(source_db) as older, psycopg.connect(source_db, autocommit=True) as app:
        older.execute("INSERT INTO apps (id, name) VALUES (1, 'older, still open')")
        x_older = txid(older)
        with app.transaction():
            app.execute("INSERT INTO apps (id, name) VALUES (2, 'newer')")
            x_newer = txid(app)
        assert x_newer > x_older
        assert not applied_in(pair.d1, x_newer)  # not yet applied
        pair.apply()
        # the newer transaction is in D1 and says so, though an older one is still open
        assert applied_in(pair.d1, x_newer) and not applied_in(pair.d1, x_older)
        (res,) = pair.d1.query("SELECT id FROM apps ORDER BY id")
        assert res.results == [{"id": 2}]
        position = Snapshot.parse(freshness(pair.d1).position or "")
        assert x_older in position.xip
        older.commit()
    pair.apply()
    assert applied_in(pair.d1, x_older) and wait_for_applied(pair.d1, x_older, timeout_seconds=0)
    pair.assert_in_sync()


def test_the_position_advances_under_continuous_writes_without_the_queue_emptying(pair, source_db):
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        with psycopg.connect(source_db, autocommit=True) as conn:
            i = 10_000
            while not stop.is_set():
                with conn.transaction():
                    conn.execute("INSERT INTO apps (id, name) VALUES (%s, 'w')", [i])
                    written.append(txid(conn))
                i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen: list[str | None] = []
        deadline = time.monotonic() + 20
        while len(set(seen)) < 3 and time.monotonic() < deadline:
            while not written:
                time.sleep(0.01)
            time.sleep(0.1)
            pair.apply(batch_size=50, max_messages=200)
            seen.append(freshness(pair.d1).position)
        assert len(set(seen)) >= 3  # it moved from run to run while writes went on
        last = Snapshot.parse(seen[-1])
        assert any(last.visible(x) for x in written) and not all(last.visible(x) for x in written[-1:] + [10**12])
    finally:
        stop.set()
        writer.join()


@given(
    st.integers(3, 10**6),
    st.lists(st.integers(0, 50), max_size=6),
    st.integers(1, 60),
    st.lists(st.integers(1, 10**6 + 100), max_size=20),
)
@settings(max_examples=200, deadline=None)
def test_applied_is_postgres_visibility(xmin, running, width, xids):
    xmax = xmin + width
    xip = sorted({xmin + r for r in running if xmin + r < xmax})
    text = f"{xmin}:{xmax}:{','.join(map(str, xip))}"
    assert str(Snapshot.parse(text)) == text
    for x in xids:
        assert applied(text, x) == (x < xmin or (x < xmax and x not in xip))
    assert not applied(None, 1)


@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 40)), max_size=30), st.integers(1, 400))
def test_a_cut_is_never_inside_a_transaction(spans, at_least):
    ranges = [TxnRange(lo, lo + n) for lo, n in spans]
    cut = valid_cut(ranges, at_least)
    assert cut >= at_least
    assert not any(r.lo <= cut < r.hi for r in ranges)
    # and it is the first such point
    assert all(any(r.lo <= c < r.hi for r in ranges) for c in range(at_least, cut))


def test_groups_keep_each_transaction_together_in_the_order_of_its_last_message():
    assert groups([7, 8, 7, None, 8, 9]) == [[0, 2], [3], [1, 4], [5]]


@pytest.fixture(scope="module")
def reader_worker():
    node = STANDIN / "node_modules" / ".bin" / "node"
    if not node.exists():
        pytest.fail("this test runs readers/position.ts in workerd with the stand-in's miniflare (cd d1stub && npm ci)")
    port = free_port()
    proc = subprocess.Popen(
        [str(node), "--no-warnings", str(STANDIN / "readers.mjs"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"the readers worker did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def put_position(url: str, position: str, at: str = "2026-01-01T00:00:00.000+00:00") -> None:
    sql = (
        "CREATE TABLE IF NOT EXISTS _d1sync_meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL); "
        f"INSERT OR REPLACE INTO _d1sync_meta VALUES ('position', '{position}'), ('position_at', '{at}')"
    )
    httpx.post(f"{url}/sql", json={"sql": sql}).raise_for_status()


def test_the_typescript_module_answers_as_postgres_would_in_workerd_through_a_session(reader_worker):
    url = reader_worker
    cases = ["100:110:103,105", "5:5:", "1000:2000:1000,1500,1999", "18446744073709551000:18446744073709551010:"]
    for position in cases:
        put_position(url, position)
        snap = Snapshot.parse(position)
        for x in {snap.xmin - 1, snap.xmin, snap.xmax - 1, snap.xmax, *snap.xip, snap.xmin + 1}:
            if x <= 0:
                continue
            answer = httpx.get(f"{url}/applied", params={"txid": str(x)}).json()
            assert answer["result"] == applied(position, x), (position, x)
            assert answer["bookmark"]  # the session's bookmark, to pass on to the next request
    fresh = httpx.get(f"{url}/freshness").json()["result"]
    assert fresh["position"] == cases[-1] and fresh["ageMs"] > 0


def test_wait_for_applied_returns_once_the_position_covers_the_transaction(reader_worker):
    url = reader_worker
    put_position(url, "200:210:205")
    waiting = {}

    def wait() -> None:
        waiting["answer"] = httpx.get(f"{url}/wait", params={"txid": "205", "timeoutMs": "5000"}, timeout=10).json()

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    put_position(url, "206:220:")  # d1sync commits a later position: 205 has ended
    t.join(10)
    assert waiting["answer"]["result"] is True
    timed_out = httpx.get(f"{url}/wait", params={"txid": "999", "timeoutMs": "200"}).json()
    assert timed_out["result"] is False
    assert json.dumps(timed_out)  # plain JSON for the caller


@given(
    st.integers(10, 1000),
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 500), st.integers(0, 30)), max_size=25, unique_by=lambda t: t[0]
    ),
    st.integers(1, 600),
)
def test_a_partial_position_counts_exactly_the_transactions_still_to_come_as_running(xmin, txns, cut):
    xmax = xmin + 50
    ranges = [TxnRange(lo, lo + n, xmin + off) for off, lo, n in txns]
    position = partial(f"{xmin}:{xmax}:", ranges, cut)
    assert position is not None
    for r in ranges:
        assert applied(position, r.xid) == (r.hi <= cut)
    assert applied(position, xmin - 1) and not applied(position, xmax)
