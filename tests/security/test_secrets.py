"""Secrets stay secret: an API token and a database password in the environment, errors forced on both
sides, and neither appears in logs, exceptions, Dagster event metadata or --json output."""

import json
import logging
import os
import subprocess
import sys

import dagster as dg
import psycopg
import pytest

from d1sync_dagster.definitions import APPLY_JOB, build_definitions
from d1sync_dagster.defs.resources import D1Resource, PostgresResource
from tests.conftest import ROOT

TOKEN = "cf-token-SECRET-1f2e3d4c5b6a"
PASSWORD = "pg-pass-SECRET-9a8b7c"


@pytest.fixture
def secret_db(pg_admin_url, source_db):
    """A login role with a password on the test database (so the URL really carries a secret)."""
    role = "d1sync_secret_role"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    info = psycopg.conninfo.conninfo_to_dict(source_db)
    url = f"postgresql://{role}:{PASSWORD}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{info['dbname']}"
    try:
        yield url
    finally:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {role} CASCADE")
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and PASSWORD not in text, text[:500]


def run_cli(*args, env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DATABASE_URL", "D1_"))} | env
    return subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "-v", *args], capture_output=True, text=True, env=full, cwd=ROOT
    )


def test_cli_errors_on_both_sides_never_print_the_secrets(secret_db, d1_standin):
    cf = {
        "CLOUDFLARE_ACCOUNT_ID": d1_standin.account_id,
        "CLOUDFLARE_D1_DATABASE_ID": d1_standin.database_id,
        "CLOUDFLARE_API_TOKEN": TOKEN,  # wrong token: D1 answers 401
        "CLOUDFLARE_API_BASE_URL": f"{d1_standin.base_url}/client/v4",
    }
    # D1 refuses (bad token); Postgres works with the password.
    out = run_cli("setup", "--json", env={"DATABASE_URL": secret_db, **cf})
    assert out.returncode == 3 and "401" in out.stderr
    assert_clean(out.stdout, out.stderr)
    # Postgres unreachable (the URL with its password must not be echoed).
    bad_pg = f"postgresql://someone:{PASSWORD}@127.0.0.1:1/db"
    out = run_cli("apply", "--json", env={"DATABASE_URL": bad_pg, **cf})
    assert out.returncode == 3 and "cannot connect to Postgres" in out.stderr
    assert_clean(out.stdout, out.stderr)
    # D1 unreachable, with retries logged at -v.
    out = run_cli(
        "status", "--json", env={"DATABASE_URL": secret_db, **cf, "CLOUDFLARE_API_BASE_URL": "http://127.0.0.1:1/x"}
    )
    assert_clean(out.stdout, out.stderr)


def test_apply_json_output_and_logs_carry_no_secret(secret_db, tmp_path, caplog):
    env = {"DATABASE_URL": secret_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run_cli("setup", env=env).returncode == 0
    with psycopg.connect(secret_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    out = run_cli("apply", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["drained"]
    assert_clean(out.stdout, out.stderr)


def test_dagster_failures_and_metadata_carry_no_secret(secret_db, d1_standin, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", secret_db)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", d1_standin.account_id)
    monkeypatch.setenv("CLOUDFLARE_D1_DATABASE_ID", d1_standin.database_id)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_API_BASE_URL", f"{d1_standin.base_url}/client/v4")
    defs = build_definitions(str(ROOT / "schema.json"))
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(APPLY_JOB).execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success  # D1 answers 401 to the wrong token
        events = instance.all_logs(result.run_id)
        dump = "\n".join(str(e) for e in events) + str(result.all_events)
        assert "401" in dump
        assert_clean(dump)
        run = instance.get_run_by_id(result.run_id)
        assert_clean(json.dumps(run.run_config, default=str), str(run.tags))


def test_http_client_logs_no_token_while_retrying(d1_standin, caplog):
    caplog.set_level(logging.DEBUG)
    c = d1_standin.client(sleep=lambda s: None)
    d1_standin.inject({"status": 500}, {"status": 429, "headers": {"retry-after": "0"}}, clear=True)
    c.query("SELECT 1")
    assert_clean(caplog.text.replace(d1_standin.api_token, "<test token>"))
    assert d1_standin.api_token not in caplog.text
    c.close()


def test_resources_built_from_env_hold_variable_names_not_values(monkeypatch):
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acct")
    monkeypatch.setenv("CLOUDFLARE_D1_DATABASE_ID", "db")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{PASSWORD}@h/db")
    defs = build_definitions(str(ROOT / "schema.json"))
    assert_clean(repr(defs.resources["d1"]), repr(defs.resources["postgres"]))
    # The resource holds the variable's name (dg.EnvVar), resolved only when a run uses it.
    token = defs.resources["d1"].api_token
    assert isinstance(token, dg.EnvVar) and token == "CLOUDFLARE_API_TOKEN"
    assert isinstance(defs.resources["postgres"], PostgresResource) and isinstance(defs.resources["d1"], D1Resource)


@pytest.mark.parametrize(
    "url, hint",
    [
        # a typo in the scheme: libpq echoes the whole string in its "missing =" error
        ("postgressql://postgres:S3cretPassw0rd@127.0.0.1:5432/postgres", "must start with postgresql://"),
        # an unencoded @ in the password: libpq takes the rest of the password for the host name
        ("postgresql://postgres:S3cret@Passw0rd@127.0.0.1:1/postgres", "percent-encode it"),
        ("postgresql://postgres:S3c@ret@Pass:w0rd@nohost.invalid:5432/postgres", "percent-encode it"),
        ("host=nohost.invalid user=postgres password=S3cretPassw0rd connect_timeout=2", ""),
    ],
)
def test_connection_errors_show_no_part_of_a_password(url, hint):
    from d1sync_dagster.clients.pgmq import PgmqClient
    from d1sync_dagster.errors import D1SyncError

    with pytest.raises(D1SyncError) as e:
        PgmqClient(url, connect_timeout=2)
    message = str(e.value)
    for piece in ("S3cret", "Passw0rd", "ret@Pass", "w0rd", "Pass"):
        assert piece not in message, message
    assert hint in message
    out = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "DATABASE_URL": url},
    )
    assert out.returncode in (2, 3) and not any(p in out.stdout + out.stderr for p in ("S3cret", "Passw0rd", "w0rd"))
