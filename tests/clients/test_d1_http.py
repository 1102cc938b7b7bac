"""The httpx client against the D1 HTTP API stand-in: retries, errors, secrets, redirects."""

import sqlite3

import httpx
import pytest

from d1sync_dagster.clients.d1 import HttpD1Client, RetryPolicy
from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.core.statements import Statement
from d1sync_dagster.errors import D1Error
from tests.conftest import free_port

FAKE_TOKEN = "fake-token-for-tests"  # not a credential: the tests check it never leaks


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(d1_standin, sleeps):
    d1_standin.reset()
    c = d1_standin.client(sleep=sleeps.append, retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=5))
    yield c
    c.close()


def test_429_is_retried_honouring_retry_after(d1_standin, client, sleeps):
    d1_standin.inject({"status": 429, "headers": {"retry-after": "3"}})
    (res,) = client.query("SELECT 1 AS one")
    assert res.results == [{"one": 1}]
    assert sleeps == [3.0]
    assert client.requests == 2


def test_500_is_retried_with_backoff(d1_standin, client, sleeps, caplog):
    d1_standin.inject({"status": 500}, {"status": 503})
    with caplog.at_level("WARNING", logger="d1sync_dagster.clients.d1"):
        (res,) = client.query("SELECT 2 AS two")
    assert res.results == [{"two": 2}]
    retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert ["returned 500" in m for m in retried[:2]] == [True, False] and "returned 503" in retried[1]
    # Past the two injected answers, only a transport error may be retried: the stand-in closing a kept-alive
    # connection the client was reusing (seen on a loaded machine), which the client must retry too.
    assert all("unreachable" in m for m in retried[2:]) and len(retried) <= 3
    assert len(sleeps) == len(retried) and all(0 < s <= 5 for s in sleeps)


def test_persistent_5xx_gives_up_with_a_typed_retryable_error(d1_standin, client, sleeps):
    d1_standin.inject(*[{"status": 502}] * 4)
    with pytest.raises(D1Error, match="returned 502") as e:
        client.query("SELECT 1")
    assert e.value.retryable and e.value.status == 502
    assert len(sleeps) == 3


def test_500_after_d1_committed_replays_harmlessly_when_idempotent(d1_standin, client):
    client.batch([Statement("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")])
    d1_standin.inject({"status": 500, "after": True})  # D1 commits, the response is lost
    upsert = Statement("INSERT INTO t VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET v = excluded.v", (1, "a"))
    client.batch([upsert])
    (res,) = client.query("SELECT count(*) AS n FROM t")
    assert res.results == [{"n": 1}]


def test_400_sql_error_is_clear_and_not_retried(client, sleeps):
    with pytest.raises(D1Error) as e:
        client.query("SELEC nonsense")
    assert e.value.status == 400 and e.value.code == 7500 and not e.value.retryable
    assert "syntax error" in str(e.value) and e.value.statement_index == 0
    assert sleeps == []


def test_bad_token_is_401_and_the_token_never_appears(d1_standin):
    token = "wrong-token-do-not-print-1234567890"
    c = HttpD1Client(
        account_id=d1_standin.account_id,
        database_id=d1_standin.database_id,
        api_token=token,
        base_url=f"{d1_standin.base_url}/client/v4",
    )
    with pytest.raises(D1Error) as e:
        c.query("SELECT 1")
    assert e.value.status == 401 and "CLOUDFLARE_API_TOKEN" in str(e.value)
    assert token not in str(e.value) and token not in repr(e.value)


def test_unknown_database_is_404(d1_standin):
    c = HttpD1Client(
        account_id=d1_standin.account_id,
        database_id="no-such-db",
        api_token=d1_standin.api_token,
        base_url=f"{d1_standin.base_url}/client/v4",
    )
    with pytest.raises(D1Error, match="404.*check the account and database ids"):
        c.query("SELECT 1")


def test_token_echoed_in_an_error_body_is_masked(d1_standin, client):
    d1_standin.inject(
        {"status": 400, "body": {"success": False, "errors": [{"code": 1, "message": f"bad {d1_standin.api_token}"}]}}
    )
    with pytest.raises(D1Error) as e:
        client.query("SELECT 1")
    assert d1_standin.api_token not in str(e.value) and "***" in str(e.value)


def test_redirect_is_not_followed(d1_standin, client):
    d1_standin.inject({"status": 302, "headers": {"location": "http://127.0.0.1:9/steal"}})
    with pytest.raises(D1Error, match="returned 302"):
        client.query("SELECT 1")


def test_unreachable_api_is_retried_then_a_clear_error(sleeps):
    c = HttpD1Client(
        account_id="a",
        database_id="d",
        api_token=FAKE_TOKEN,
        base_url=f"http://127.0.0.1:{free_port()}/client/v4",
        retry=RetryPolicy(attempts=3, base_delay=0.01),
        sleep=sleeps.append,
    )
    with pytest.raises(D1Error, match="unreachable: ConnectError") as e:
        c.query("SELECT 1")
    assert e.value.retryable and len(sleeps) == 2
    assert FAKE_TOKEN not in str(e.value)


def test_worker_crash_is_retried(d1_standin, client, sleeps):
    d1_standin.inject({"crash": True})  # the Worker throws: a 500 from the runtime
    (res,) = client.query("SELECT 3 AS three")
    assert res.results == [{"three": 3}]
    assert len(sleeps) == 1


def test_d1_engine_itself_refuses_101_parameters_and_params_not_strings(d1_standin):
    """Without our client-side checks, the real engine refuses what production refuses."""
    d1_standin.reset()
    url = f"{d1_standin.base_url}/client/v4/accounts/{d1_standin.account_id}/d1/database/{d1_standin.database_id}/query"
    headers = {"authorization": f"Bearer {d1_standin.api_token}"}
    sql = "SELECT " + ",".join(["?"] * 101)
    r = httpx.post(url, headers=headers, json={"sql": sql, "params": ["1"] * 101})
    assert r.status_code == 400 and "too many SQL variables" in r.json()["errors"][0]["message"]
    r = httpx.post(url, headers=headers, json={"sql": "SELECT ?", "params": [1]})
    assert r.status_code == 400 and "must be strings" in r.json()["errors"][0]["message"]


def test_local_engine_itself_refuses_101_parameters(tmp_path):
    c = LocalD1Client(tmp_path / "x.sqlite")
    with pytest.raises(sqlite3.Error, match="too many SQL variables"):
        c._conn.execute("SELECT " + ",".join(["?"] * 101), ["1"] * 101)


def test_answer_later_than_the_timeout_after_d1_committed_is_retried_and_replays_harmlessly(d1_standin, sleeps):
    d1_standin.reset()
    c = d1_standin.client(sleep=sleeps.append, timeout=0.5)
    c.batch([Statement("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")])
    d1_standin.inject({"after": True, "delay_ms": 1200})
    upsert = Statement("INSERT INTO t VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET v = excluded.v", (1, "a"))
    c.batch([upsert])
    assert len(sleeps) == 1  # the read timed out once, then the replay went through
    (res,) = c.query("SELECT count(*) AS n FROM t")
    assert res.results == [{"n": 1}]
    c.close()
