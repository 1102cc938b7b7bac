"""The `d1sync` command line, run as users run it."""

import json
import os
import sqlite3
import subprocess
import sys

import psycopg

from tests.conftest import ROOT


def run(*args, env=None, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DATABASE_URL", "D1_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", *args], capture_output=True, text=True, env=full_env, cwd=cwd
    )


def test_generate_sql_for_d1_prints_the_ddl():
    out = run("generate-sql", "--target", "d1")
    assert out.returncode == 0
    assert 'CREATE TABLE IF NOT EXISTS "apps"' in out.stdout and "WITHOUT ROWID" in out.stdout


def test_setup_local_backend_is_idempotent(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    first = run("setup", "--json", env=env)
    assert first.returncode == 0, first.stderr
    second = run("setup", "--json", env=env)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["tables"] == ["apps", "app_versions"] and result["d1_backend"] == "local"
    with sqlite3.connect(tmp_path / "d1.sqlite") as conn:
        version = conn.execute("SELECT value FROM _d1sync_meta WHERE key = 'schema_version'").fetchone()[0]
    assert version == result["schema_version"]
    with psycopg.connect(source_db) as conn:
        n = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'd1sync_capture_%'").fetchone()[0]
    assert n == 8


def test_setup_http_backend(source_db, d1_standin):
    d1_standin.reset()
    env = {
        "DATABASE_URL": source_db,
        "CLOUDFLARE_ACCOUNT_ID": d1_standin.account_id,
        "CLOUDFLARE_D1_DATABASE_ID": d1_standin.database_id,
        "CLOUDFLARE_API_TOKEN": d1_standin.api_token,
        "CLOUDFLARE_API_BASE_URL": f"{d1_standin.base_url}/client/v4",
    }
    out = run("setup", env=env)
    assert out.returncode == 0, out.stderr
    assert "D1 backend http" in out.stdout
    (res,) = d1_standin.client().query("SELECT value FROM _d1sync_meta WHERE key = 'schema_version'")
    assert len(res.results) == 1


def test_invalid_schema_exits_2_with_the_reason(tmp_path):
    bad = tmp_path / "schema.json"
    bad.write_text(json.dumps({"t": {"primaryKey": "nope", "columns": {"id": "INTEGER"}}}))
    out = run("generate-sql", "--schema", str(bad))
    assert out.returncode == 2
    assert "table 't'" in out.stderr and "not among columns" in out.stderr and "Traceback" not in out.stderr


def test_unreachable_postgres_exits_3_without_the_password(tmp_path):
    out = run(
        "setup",
        env={"DATABASE_URL": "postgresql://u:s3cretpw@127.0.0.1:1/x", "D1_LOCAL_PATH": str(tmp_path / "d.sqlite")},
    )
    assert out.returncode == 3
    assert "cannot connect to Postgres" in out.stderr and "s3cretpw" not in out.stderr + out.stdout


def test_unreachable_d1_exits_3_and_keeps_the_token_secret(source_db):
    env = {
        "DATABASE_URL": source_db,
        "CLOUDFLARE_ACCOUNT_ID": "a",
        "CLOUDFLARE_D1_DATABASE_ID": "d",
        "CLOUDFLARE_API_TOKEN": "tok-never-print-me",
        "CLOUDFLARE_API_BASE_URL": "http://127.0.0.1:1/client/v4",
        "D1SYNC_D1_ATTEMPTS": "1",  # the retries and their backoff are tested in tests/clients
    }
    out = run("setup", env=env)
    assert out.returncode == 3
    assert "unreachable" in out.stderr and "tok-never-print-me" not in out.stderr + out.stdout


def test_a_bad_attempts_setting_is_a_clear_error():
    env = {"CLOUDFLARE_ACCOUNT_ID": "a", "CLOUDFLARE_D1_DATABASE_ID": "d", "CLOUDFLARE_API_TOKEN": "t"}
    out = run("setup", env=env | {"D1SYNC_D1_ATTEMPTS": "0", "DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert out.returncode == 2
    assert "D1SYNC_D1_ATTEMPTS must be a whole number of at least 1, got '0'" in out.stderr


def test_partial_cloudflare_config_is_a_clear_error():
    out = run("setup", env={"CLOUDFLARE_ACCOUNT_ID": "a", "DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert out.returncode == 2
    assert "missing: CLOUDFLARE_D1_DATABASE_ID, CLOUDFLARE_API_TOKEN" in out.stderr


def test_apply_and_status_from_the_command_line(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
    before = json.loads(run("status", "--json", env=env).stdout)
    assert before["queue_depth"] == 30 and before["last_applied_at"] is None
    out = run("apply", "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["drained"] and report["tables"]["apps"]["upserts"] == 30 and report["requests"] == 1
    after = json.loads(run("status", "--json", env=env).stdout)
    assert after["queue_depth"] == 0 and after["last_applied_at"] and after["last_applied_msg_id"] == 30
    assert after["dead_letters"] == {"apps": 0, "app_versions": 0}
    assert after["schema_version_applied"] == after["schema_version_current"]
    text = run("status", env=env)
    assert "0 messages waiting" in text.stdout and "current" in text.stdout
    plain = run("apply", env=env)
    assert plain.returncode == 0 and "applied 0 messages" in plain.stdout


def test_apply_exits_1_when_messages_were_dead_lettered(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("""SELECT pgmq.send('replicate_data', '{"type": "INSERT", "table": "nope", "record": {}}')""")
        conn.execute("INSERT INTO apps (id, name) VALUES (1, 'fine')")
    out = run("apply", env=env)
    assert out.returncode == 1 and "1 dead-lettered" in out.stdout
    st = json.loads(run("status", "--json", env=env).stdout)
    assert st["dead_letters"]["nope"] == 1 and st["queue_depth"] == 0


def test_apply_against_unreachable_d1_fails_clearly_and_keeps_the_queue(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    bad = {
        "DATABASE_URL": source_db,
        "CLOUDFLARE_ACCOUNT_ID": "a",
        "CLOUDFLARE_D1_DATABASE_ID": "d",
        "CLOUDFLARE_API_TOKEN": "tok-secret-apply",
        "CLOUDFLARE_API_BASE_URL": "http://127.0.0.1:1/client/v4",
        "D1SYNC_D1_ATTEMPTS": "1",  # the retries and their backoff are tested in tests/clients
    }
    out = run("apply", "--vt", "0", env=bad)
    assert out.returncode == 3 and "unreachable" in out.stderr and "tok-secret-apply" not in out.stderr + out.stdout
    assert json.loads(run("status", "--json", env=env).stdout)["queue_depth"] == 1


def test_demo_writes_applies_and_verifies(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    out = run("demo", "--rows", "40", env=env)
    assert out.returncode == 0, out.stderr
    assert "D1 equals Postgres, row for row" in out.stdout and "apps: " in out.stdout


def test_backfill_verify_and_nuke_from_the_command_line(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 250) g")  # before capture
        conn.execute("ANALYZE apps")  # the progress ETA uses Postgres' row estimate
    assert run("setup", env=env).returncode == 0
    drift = run("verify", "--json", env=env)
    assert drift.returncode == 1 and json.loads(drift.stdout)["tables"]["apps"]["missing"] == 250
    out = run("backfill", "--table", "apps", "--chunk-size", "100", env=env)
    assert out.returncode == 0, out.stderr
    assert "apps: 250 rows in 3 chunks" in out.stdout and "queue drained" in out.stdout
    assert "backfill apps rows: 250 of ~250 (100%)" in out.stderr  # progress (plain lines: not a terminal)
    clean = run("verify", "--chunk-size", "100", env=env)
    assert clean.returncode == 0 and "apps: 250 rows in Postgres, 250 in D1, in sync" in clean.stdout
    assert "verify apps rows: 250 of ~250 (100%)" in clean.stderr
    refused = run("nuke", "--all", env=env)
    assert refused.returncode == 2 and "confirm" in refused.stderr
    unknown = run("nuke", "--table", "nope", "--yes", env=env)
    assert unknown.returncode == 2 and "'nope' is not in schema.json" in unknown.stderr
    done = run("nuke", "--table", "apps", "--yes", env=env)
    assert done.returncode == 0 and "nuked and recreated apps" in done.stdout
    assert run("verify", env=env).returncode == 1
    # --json: the drain's rate counts the 250 row changes, not the 3 range markers that carried them.
    again = run("backfill", "--table", "apps", "--chunk-size", "100", "--restart", "--json", env=env)
    applied = json.loads(again.stdout)["apply"]
    assert again.returncode == 0 and applied["markers"] == 3 and applied["rows_sent"] == 250
    assert applied["changes_per_second"] == round(250 / applied["duration_seconds"], 1)


def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_otherwise():
    import io

    from d1sync_dagster.terminal import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress("rows", 1000, stream=tty)
    bar.update(250)
    bar.update(500)
    bar.close()
    text = tty.getvalue()  # a rich bar: the count of the total, the share, the rate and the time left
    assert "rows" in text and "500/1000" in text and "50%" in text and "/s" in text and "ETA" in text
    assert text.replace("\x1b[?25h", "").endswith("\n")  # the bar's last state stays on its own line

    plain = io.StringIO()
    bar = Progress("rows", None, stream=plain)
    bar.last -= 10  # as if 10 s had passed
    bar.update(10)
    bar.update(20)  # within 5 s of the last line: not printed
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue() and "rows: 10" in plain.getvalue()
    bar.close()  # the last figure is always shown
    assert plain.getvalue().splitlines()[-1].startswith("rows: 20, ") and plain.getvalue().endswith("(done)\n")


def test_status_with_an_unreachable_d1_exits_3_with_the_reason(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    bad = {
        "DATABASE_URL": source_db,
        "CLOUDFLARE_ACCOUNT_ID": "a",
        "CLOUDFLARE_D1_DATABASE_ID": "d",
        "CLOUDFLARE_API_TOKEN": "tok-secret-status",
        "CLOUDFLARE_API_BASE_URL": "http://127.0.0.1:1/client/v4",
        "D1SYNC_D1_ATTEMPTS": "1",
    }
    out = run("status", env=bad)
    assert out.returncode == 3 and "unreachable" in out.stderr and "OUT OF DATE" not in out.stdout
    assert "tok-secret-status" not in out.stderr + out.stdout


def test_restore_after_a_mistaken_nuke_brings_d1_back_in_step(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
        assert run("apply", env=env).returncode == 0
        nuked = run("nuke", "--all", "--yes", env=env)
        bookmark = nuked.stdout.split("restore point taken before the nuke: ")[1].split()[0]
        conn.execute("UPDATE apps SET name = 'after the nuke' WHERE id <= 5")  # writes keep coming
        assert run("apply", env=env).returncode == 0
    assert run("restore", "--bookmark", bookmark, env=env).returncode == 2  # refused without --yes
    out = run("restore", "--bookmark", bookmark, "--yes", env=env)
    assert out.returncode == 0, out.stderr
    assert "D1 equals Postgres, row for row" in out.stdout and "to undo: d1sync restore --bookmark" in out.stdout
    status = json.loads(run("status", "--json", env=env).stdout)
    assert status["last_restore"]["bookmark"] == bookmark and status["last_restore"]["source"] == "cli"
    assert status["last_nuke"] is None  # the restore rewound D1, its records included, to before the nuke


def test_doctor_prints_its_findings_and_exits_by_what_it_found(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    out = run("doctor", "--json", env=env)
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert report["exit_code"] == 0 and {f["check"] for f in report["findings"]} >= {"pgmq", "capture apps", "d1"}
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE apps DISABLE TRIGGER d1sync_capture_update")
    out = run("doctor", env=env)
    assert out.returncode == 1 and "FAIL  capture apps" in out.stdout and "fix: ALTER TABLE" in out.stdout
    bad = env | {"DATABASE_URL": "postgresql://postgres:S3cretPw@127.0.0.1:1/x"}
    out = run("doctor", env=bad)
    assert out.returncode == 3 and "S3cretPw" not in out.stdout + out.stderr and "FAIL  postgres" in out.stdout


def test_status_exits_1_and_says_so_when_the_capture_path_is_broken(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    assert run("setup", env=env).returncode == 0
    assert run("status", env=env).returncode == 0
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE app_versions DISABLE TRIGGER d1sync_capture_delete")
    out = run("status", env=env)
    assert out.returncode == 1 and "FAIL: capture app_versions" in out.stdout and "ENABLE TRIGGER" in out.stdout
    report = json.loads(run("status", "--json", env=env).stdout)
    assert report["problems"][0]["check"] == "capture app_versions"


def test_every_command_works_on_the_target_it_is_given(source_db, tmp_path):
    targets = {
        "prod": {"queue": "replicate_data", "d1": {"localPath": str(tmp_path / "prod.sqlite")}},
        "staging": {"queue": "replicate_staging", "tables": ["apps"], "d1": {"localPath": str(tmp_path / "st.sqlite")}},
    }
    (tmp_path / "targets.json").write_text(json.dumps(targets))
    env = {"DATABASE_URL": source_db, "D1SYNC_TARGETS": str(tmp_path / "targets.json")}
    for t in ("prod", "staging"):
        done = run("setup", "--target", t, "--create-example-tables", env=env)
        assert done.returncode == 0, done.stderr
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 12) g")
    refused = run("apply", env=env)
    assert refused.returncode == 2 and "several targets are configured (prod, staging): pass --target" in refused.stderr
    done = run("apply", "--target", "staging", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["messages"] == 12
    with sqlite3.connect(tmp_path / "st.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM apps").fetchone()[0] == 12
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'app_versions'").fetchone()[0] == 0
    assert (
        not (tmp_path / "prod.sqlite").exists()
        or sqlite3.connect(tmp_path / "prod.sqlite").execute("SELECT count(*) FROM apps").fetchone()[0] == 0
    )
    # status and doctor without --target: each target in turn, and the worst exit code.
    status = run("status", env=env)
    assert "== target prod (queue replicate_data)" in status.stdout and "== target staging" in status.stdout
    assert "12" in status.stdout.split("== target staging")[0]  # prod still has its 12 changes waiting
    assert "== 2 targets:" in status.stdout
    both = json.loads(run("status", "--json", env=env).stdout)
    assert set(both["targets"]) == {"prod", "staging"} and both["total"]["queue_depth"] == 12 + 0
    assert both["targets"]["prod"]["queue"] == "replicate_data"
    unknown = run("status", "--target", "nope", env=env)
    assert unknown.returncode == 2 and "no target 'nope' (configured: prod, staging)" in unknown.stderr
    ddl = run("generate-sql", "--target", "staging", "--sql", "d1", env=env)
    assert ddl.returncode == 0 and '"apps"' in ddl.stdout and '"app_versions"' not in ddl.stdout
    sql = run("generate-sql", "--target", "staging", env=env).stdout
    assert "d1sync_capture_insert__replicate_staging" in sql and "app_versions" not in sql
    gone = run("teardown", "--target", "staging", "--yes", env=env)
    assert gone.returncode == 0 and "capture of queue replicate_staging removed from apps" in gone.stdout
    with psycopg.connect(source_db) as conn:
        names = {r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'd1sync_capture%'")}
    assert names == {f"d1sync_capture_{e}" for e in ("insert", "update", "delete", "truncate")}


def test_a_missing_queue_or_pgmq_exits_2_naming_it_and_the_fix(source_db, tmp_path):
    env = {"DATABASE_URL": source_db, "D1_LOCAL_PATH": str(tmp_path / "d1.sqlite")}
    before = run("status", env=env)  # PGMQ is installed here, the queue not yet
    assert before.returncode == 2, before.stderr
    assert "queue replicate_data does not exist" in before.stderr and "d1sync setup" in before.stderr
    assert run("setup", env=env).returncode == 0
    for command in ("status", "apply"):
        out = run(command, env=env | {"D1SYNC_QUEUE": "nosuchq"})
        assert out.returncode == 2, out.stderr
        assert "the queue nosuchq does not exist" in out.stderr and "queues here: replicate_data" in out.stderr
        assert "D1SYNC_QUEUE=nosuchq" in out.stderr and "relation" not in out.stderr
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("DROP SCHEMA pgmq CASCADE")
    out = run("status", env=env)
    assert out.returncode == 2 and "PGMQ is not installed" in out.stderr and "--install-pgmq" in out.stderr
    assert 'schema "pgmq" does not exist' not in out.stderr


def test_dev_on_a_port_in_use_exits_2_at_once_naming_the_port(tmp_path):
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = run("dev", "--port", str(port), "--stop-after", "5", env={"D1SYNC_STATE_DIR": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and "--port N" in out.stderr
    assert "Dagster UI" not in out.stdout and time.monotonic() - started < 10
    assert not (tmp_path / "postgres").exists()  # nothing was started


def test_tables_are_drawn_on_a_terminal_and_plain_elsewhere():
    import io

    from d1sync_dagster.terminal import print_table

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    rows = [("FAIL", "schema apps.rating", "no longer in the Postgres table", 'remove "rating"')]
    print_table(("", "check", "finding", "fix"), rows, stream=tty)
    print_table(("", "check", "finding", "fix"), rows, stream=plain)
    assert "┃" in tty.getvalue() or "│" in tty.getvalue()  # a drawn table
    assert plain.getvalue() == 'FAIL  schema apps.rating  no longer in the Postgres table  remove "rating"\n'
