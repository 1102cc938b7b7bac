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


#: Accounts 1..RENAMED change their id now and then (a delete and an insert in one transaction: two
#: statements, which a request budget forced tiny stages); the transfers use the others.
RENAMED = 10


class Bank:
    """Writers moving money: mostly two-account transfers, every tenth a transaction over 20-50 accounts, and
    one writer that moves accounts to a new id (delete + insert, with a transfer between two of them)."""

    def __init__(self, url: str, writers: int = 3, seed: int = 0) -> None:
        self.url, self.stop, self.done = url, threading.Event(), 0
        self.threads = [threading.Thread(target=self._run, args=(seed * 10 + i,)) for i in range(writers)]
        self.threads.append(threading.Thread(target=self._rename, args=(seed,)))

    def _rename(self, seed: int) -> None:
        rng = random.Random(seed)
        ids = {k: k for k in range(1, RENAMED + 1)}
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                a, b = rng.sample(range(1, RENAMED + 1), 2)
                new = ids[a] + 1000
                with conn.transaction():
                    conn.execute("UPDATE accounts SET balance = balance - 3 WHERE id = %s", [ids[b]])
                    conn.execute(
                        "WITH gone AS (DELETE FROM accounts WHERE id = %s RETURNING balance) "
                        "INSERT INTO accounts SELECT %s, balance + 3 FROM gone",
                        [ids[a], new],
                    )
                ids[a] = new
                time.sleep(0.005)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    with conn.transaction():
                        if rng.random() < 0.1:
                            ids = sorted(rng.sample(range(RENAMED + 1, ACCOUNTS + 1), rng.randint(20, 40)))
                            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = ANY(%s)", [ids[1:]])
                            conn.execute(
                                "UPDATE accounts SET balance = balance + %s WHERE id = %s", [len(ids) - 1, ids[0]]
                            )
                        else:
                            a, b = sorted(rng.sample(range(RENAMED + 1, ACCOUNTS + 1), 2))
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
        self.staged = 0  # transactions that went through staging meanwhile
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


def run_randomized(
    pair: Pair,
    source_db: str,
    read,
    *,
    seed: int,
    rounds: int = 12,
    between=None,
    settle=None,
    budgets=(1, 300, 3_000, 2_000_000),
    transaction_budgets=(1, 300, 50_000_000),
) -> Reader:
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
                request_bytes=rng.choice(budgets),  # tiny budgets: split by transaction
                transaction_bytes=rng.choice(
                    transaction_budgets
                ),  # tiny: a transaction of several statements is staged
                planner_process=False,
            )
            try:
                reader.staged += apply(pair.pg, pair.d1, SCHEMA, options).staged_transactions
            except D1Error:
                pass  # an injected fault ended the run; the next one goes on
    if settle is not None:
        settle()  # faults the last run left unanswered would meet the final one (the reader ate them before)
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
        assert reader.staged > 0  # some transactions were larger than the request forced tiny: staged
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
        # A request per transaction over HTTP is slow next to the writers: budgets that keep up.
        reader = run_randomized(
            pair,
            source_db,
            http_reader(d1_standin),
            seed=3,
            between=faults,
            settle=lambda: d1_standin.inject(clear=True),
            budgets=(3_000, 2_000_000),
            transaction_budgets=(50_000_000,),  # staging over HTTP: test_a_staged_transaction_over_the_http_api
        )
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


class Crash(Exception):
    pass


class DiesWhileStaging(LocalD1Client):
    """The local D1 file, and a process that dies after its second staging request (an injected crash)."""

    staged = 0

    def batch(self, statements):
        if any("_d1sync_stage_" in s.sql and s.sql.startswith("INSERT") for s in statements):
            self.staged += 1
            if self.staged == 2:
                raise Crash("killed between the requests of a staged transaction")
        return super().batch(statements)


def test_a_transaction_larger_than_one_request_is_staged_and_published_whole_even_after_a_crash(source_db, tmp_path):
    path = tmp_path / "d1.sqlite"
    d1 = DiesWhileStaging(path)
    pair = bank(source_db, d1)
    try:
        with Reader(local_reader(path)) as reader:
            with psycopg.connect(source_db) as conn:  # one transaction over every account, a delete, an insert
                conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id > 1")
                conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = 1", [ACCOUNTS - 1])
                conn.execute("WITH gone AS (DELETE FROM accounts WHERE id = %s RETURNING balance) "
                             "INSERT INTO accounts SELECT %s, balance FROM gone", [ACCOUNTS, ACCOUNTS + 1])  # fmt: skip
                conn.commit()
            tiny = ApplyOptions(request_bytes=300, transaction_bytes=300, planner_process=False)
            with pytest.raises(Crash):
                apply(pair.pg, d1, SCHEMA, tiny)
            (res,) = d1.query(f"SELECT count(*) AS n FROM accounts WHERE balance <> 1000 OR id > {ACCOUNTS}")
            assert res.results == [{"n": 0}]  # nothing of it visible: it was only staged
            report = apply(pair.pg, d1, SCHEMA, tiny)  # the next run stages it again from the start
            assert report.staged_transactions == 1 and report.split_transactions == 0 and report.drained
        assert reader.reads > 10 and reader.torn == [], reader.torn[:5]
        pair.assert_in_sync()
        (res,) = d1.query(
            "SELECT (SELECT count(*) FROM _d1sync_stage_accounts) + "
            "(SELECT count(*) FROM _d1sync_unstage_accounts) AS n"
        )
        assert res.results == [{"n": 0}]  # the staging tables are emptied by the publish
    finally:
        pair.pg.close()
        d1.close()


def test_a_transaction_too_large_for_one_request_on_shards_is_split_with_a_warning_in_the_run_and_doctor(
    source_db, tmp_path
):
    from d1sync_dagster.clients.d1_shards import ShardedD1
    from d1sync_dagster.engine.doctor import diagnose

    home, other = LocalD1Client(tmp_path / "home.sqlite"), LocalD1Client(tmp_path / "s0.sqlite")
    d1 = ShardedD1(home, {"s0": other}, {})
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
        home.close()
        other.close()


def test_a_staged_transaction_over_the_http_api_is_published_whole(source_db, d1_standin):
    d1_standin.reset()
    d1 = d1_standin.client(sleep=lambda s: None)
    pair = bank(source_db, d1)
    try:
        with psycopg.connect(source_db) as conn:
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id > 1")
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = 1", [ACCOUNTS - 1])
            conn.execute("DELETE FROM accounts WHERE id = 2")
            conn.commit()
        report = apply(pair.pg, d1, SCHEMA, ApplyOptions(request_bytes=300, transaction_bytes=300))
        assert report.staged_transactions == 1 and report.split_transactions == 0
        pair.assert_in_sync()
    finally:
        pair.pg.close()
        d1.close()
