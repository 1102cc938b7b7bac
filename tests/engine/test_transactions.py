"""Readers at the edge never see half a transaction: money moves between accounts in Postgres transactions
(two UPDATEs, or a few dozen accounts at once) while apply runs with every kind of split forced on it, and a
reader polling D1 must always find the total Postgres always had."""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import psycopg
import pytest

from d1sync_dagster.clients.d1 import RetryPolicy
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import D1Error
from d1sync_dagster.schema import parse_schema
from tests.helpers import Pair

ACCOUNTS, START = 60, 1000
SCHEMA = parse_schema({"accounts": {"primaryKey": "id", "columns": {"id": "INTEGER", "balance": "INTEGER"}}})


def bank(source_db, d1) -> Pair:
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
    pg = PgmqClient(source_db)
    setup(pg, d1, SCHEMA)
    pg.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g", [START, ACCOUNTS])
    pair = Pair(pg, d1, SCHEMA)
    pair.apply()
    return pair


class Bank:
    """Writers moving money: mostly two-account transfers, every tenth a transaction over 20-50 accounts."""

    def __init__(self, url: str, writers: int = 3, seed: int = 0) -> None:
        self.url, self.stop, self.done = url, threading.Event(), 0
        self.threads = [threading.Thread(target=self._run, args=(seed * 10 + i,)) for i in range(writers)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    with conn.transaction():
                        if rng.random() < 0.1:
                            ids = sorted(rng.sample(range(1, ACCOUNTS + 1), rng.randint(20, 50)))
                            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = ANY(%s)", [ids[1:]])
                            conn.execute(
                                "UPDATE accounts SET balance = balance + %s WHERE id = %s", [len(ids) - 1, ids[0]]
                            )
                        else:
                            a, b = sorted(rng.sample(range(1, ACCOUNTS + 1), 2))
                            amount = rng.randint(1, 50)
                            conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", [amount, a])
                            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, b])
                    self.done += 1
                except psycopg.errors.DeadlockDetected:
                    continue

    def __enter__(self) -> Bank:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class Reader:
    """Polls D1's total in a loop, counting the reads that saw a total Postgres never had."""

    def __init__(self, read) -> None:
        self.read, self.stop, self.reads, self.torn = read, threading.Event(), 0, []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # raised in the test by __exit__
            self.errors.append(e)

    def _loop(self) -> None:
        while not self.stop.is_set():
            got = self.read()
            if got is None:  # the read itself failed (an injected fault): nothing seen
                continue
            total, n = got
            self.reads += 1
            if (total, n) != (ACCOUNTS * START, ACCOUNTS):
                self.torn.append(total - ACCOUNTS * START)

    def __enter__(self) -> Reader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.errors:
            raise self.errors[0]


def local_reader(path):
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
    return lambda: conn.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()


def http_reader(standin):
    client = standin.client(retry=RetryPolicy(attempts=1))

    def read():
        try:
            return tuple(client.query("SELECT sum(balance) AS s, count(*) AS n FROM accounts")[0].results[0].values())
        except D1Error:  # the stand-in's injected faults answer whoever calls next
            return None

    return read


def run_randomized(pair: Pair, source_db: str, read, *, seed: int, rounds: int = 12, between=None) -> Reader:
    rng = random.Random(seed)
    with Reader(read) as reader, Bank(source_db, seed=seed) as writers:
        done, deadline = 0, time.monotonic() + 60
        while (done < rounds or writers.done < 300) and time.monotonic() < deadline:
            done += 1
            time.sleep(rng.choice([0.0, 0.02, 0.1]))
            if between is not None:
                between(rng)
            options = ApplyOptions(
                batch_size=rng.choice([1, 2, 3, 7, 50, 500]),
                request_bytes=rng.choice([1, 300, 3_000, 2_000_000]),  # tiny budgets: split by transaction
                planner_process=False,
            )
            try:
                apply(pair.pg, pair.d1, SCHEMA, options)
            except D1Error:
                pass  # an injected fault ended the run; the next one goes on
    apply(pair.pg, pair.d1, SCHEMA, ApplyOptions())
    assert writers.done >= 300
    return reader


@pytest.mark.parametrize("seed", [1, 2])
def test_a_reader_of_the_local_file_never_sees_half_a_transaction(source_db, tmp_path, seed):
    d1 = LocalD1Client(tmp_path / "d1.sqlite")
    pair = bank(source_db, d1)
    try:
        reader = run_randomized(pair, source_db, local_reader(tmp_path / "d1.sqlite"), seed=seed)
        assert reader.reads > 100 and reader.torn == [], f"{len(reader.torn)} torn of {reader.reads}: {reader.torn[:5]}"
        pair.assert_in_sync()
    finally:
        pair.pg.close()
        d1.close()


def test_a_reader_over_the_http_api_never_sees_half_a_transaction_with_overload_faults(source_db, d1_standin):
    d1_standin.reset()
    d1 = d1_standin.client(sleep=lambda s: None, retry=RetryPolicy(attempts=2, base_delay=0.01))
    pair = bank(source_db, d1)
    overloaded = {"status": 400, "body": {"result": None, "success": False, "errors": [
        {"code": 7500, "message": "D1 DB exceeded its CPU time limit and was reset."}]}}  # fmt: skip

    def faults(rng: random.Random) -> None:
        if rng.random() < 0.5:
            d1_standin.inject(*[overloaded] * rng.randint(1, 3))

    try:
        reader = run_randomized(pair, source_db, http_reader(d1_standin), seed=3, between=faults)
        assert reader.reads > 20 and reader.torn == [], f"{len(reader.torn)} torn of {reader.reads}: {reader.torn[:5]}"
        d1_standin.inject(clear=True)
        pair.apply()
        pair.assert_in_sync()
    finally:
        d1_standin.inject(clear=True)
        pair.pg.close()
        d1.close()


def test_a_refused_change_dead_letters_its_whole_transfer_and_the_total_stays_whole(source_db, tmp_path):
    d1 = LocalD1Client(tmp_path / "d1.sqlite")
    pair = bank(source_db, d1)
    try:
        # D1 refuses account 7 ever going above 5,000: the transfer that would do it is refused whole
        d1.query("CREATE TRIGGER cap BEFORE UPDATE ON accounts WHEN NEW.id = 7 AND NEW.balance > 5000 "
                 "BEGIN SELECT RAISE(ABORT, 'account 7 over its cap'); END")  # fmt: skip
        pair.sql("UPDATE accounts SET balance = balance + 10 WHERE id = 1")
        pair.sql("UPDATE accounts SET balance = balance - 10 WHERE id = 2")
        with psycopg.connect(source_db) as conn:
            conn.execute("UPDATE accounts SET balance = balance - 4500 WHERE id = 3")
            conn.execute("UPDATE accounts SET balance = balance + 4500 WHERE id = 7")
            conn.commit()
        report = pair.apply(batch_size=500)
        assert report.dead_lettered == 2  # both changes of the refused transfer
        letters = pair.dead_letters()
        assert {m["message"]["record"]["id"] for m in letters} == {3, 7}
        assert all("over its cap" in m["error"] for m in letters)
        total, n = local_reader(tmp_path / "d1.sqlite")()
        # account 3 did not lose what 7 did not get; the one-change transactions around it applied
        assert (total, n) == (ACCOUNTS * START + 10 - 10, ACCOUNTS)
        (res,) = d1.query("SELECT id, balance FROM accounts WHERE id IN (1, 2, 3, 7) ORDER BY id")
        assert [r["balance"] for r in res.results] == [1010, 990, 1000, 1000]
    finally:
        pair.pg.close()
        d1.close()


def test_a_transaction_past_transaction_bytes_is_split_with_a_warning_in_the_run_and_in_doctor(source_db, tmp_path):
    from d1sync_dagster.engine.doctor import diagnose

    d1 = LocalD1Client(tmp_path / "d1.sqlite")
    pair = bank(source_db, d1)
    try:
        with psycopg.connect(source_db) as conn:  # one transaction: an upsert statement and a delete statement
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id <= 30")
            conn.execute("DELETE FROM accounts WHERE id = 60")
            conn.commit()
        report = apply(pair.pg, d1, SCHEMA, ApplyOptions(request_bytes=100, transaction_bytes=100))
        assert report.split_transactions == 1 and report.drained
        pair.assert_in_sync()
        dx = diagnose(lambda: PgmqClient(source_db), lambda: d1, SCHEMA)
        (finding,) = [f for f in dx.findings if f.check == "transactions"]
        assert finding.level == "warn" and "published in parts" in finding.detail and "1 in the run" in finding.detail
        # within the limits, nothing is split and doctor says every transaction is whole
        d2 = LocalD1Client(tmp_path / "d2.sqlite")
        setup(pair.pg, d2, SCHEMA)
        (ok,) = [
            f for f in diagnose(lambda: PgmqClient(source_db), lambda: d2, SCHEMA).findings if f.check == "transactions"
        ]
        assert ok.level == "ok" and "published whole" in ok.detail
        d2.close()
    finally:
        pair.pg.close()
        d1.close()
