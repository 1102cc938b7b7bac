"""`d1sync doctor`: each finding provoked on real Postgres + PGMQ and D1, shown with its fix; exit codes."""

import contextlib
import uuid

import psycopg
import pytest

from d1sync_dagster.clients.d1 import HttpD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.doctor import diagnose
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.errors import QueueError
from d1sync_dagster.sql.capture import FUNCTION_SCHEMA, capture_function, function_name, named_form_table


class Borrowed:
    """The pair's D1 client, lent to the doctor without letting it close it."""

    def __init__(self, d1):
        self.d1 = d1

    def __getattr__(self, name):
        return getattr(self.d1, name)

    def close(self):
        pass


def run(pair, url=None, d1=None):
    return diagnose(lambda: PgmqClient(url or pair.pg._url), lambda: d1 or Borrowed(pair.d1), pair.schema)


def finding(dx, check):
    (f,) = [f for f in dx.findings if f.check == check]
    return f


def test_a_healthy_setup_passes(pair):
    dx = run(pair)
    assert dx.exit_code == 0, dx.table()
    assert {f.level for f in dx.findings} <= {"ok", "warn"}
    assert finding(dx, "capture apps").detail.endswith("four capture triggers enabled, writing to replicate_data")
    assert "SQL install" in finding(dx, "pgmq").detail


def test_a_consumer_holding_the_lock_is_named(pair):
    with PgmqClient(pair.pg._url) as other, other.consumer_lock() as got:
        assert got
        f = finding(run(pair), "consumer lock")
        assert (
            f.level == "ok" and f.detail.startswith("held by pid ") and "(d1sync consumer of replicate_data" in f.detail
        )
    assert finding(run(pair), "consumer lock").detail.startswith("free")


def test_a_disabled_capture_trigger_is_found_with_the_statement_that_fixes_it(pair):
    pair.sql("ALTER TABLE apps DISABLE TRIGGER d1sync_capture_update")
    dx = run(pair)
    f = finding(dx, "capture apps")
    assert dx.exit_code == 1 and f.level == "fail" and "disabled" in f.detail and "silently lost" in f.detail
    assert 'ALTER TABLE "public"."apps" ENABLE TRIGGER d1sync_capture_update' in f.fix
    assert finding(dx, "capture app_versions").level == "ok"


def test_a_missing_trigger_and_a_trigger_of_another_queue_are_found(pair):
    pair.sql('DROP TRIGGER d1sync_capture_delete ON "public"."apps"')
    f = finding(run(pair), "capture apps")
    assert (
        f.level == "fail" and "missing" in f.detail and "d1sync_capture_delete" in f.detail and f.fix == "d1sync setup"
    )
    setup(pair.pg, pair.d1, pair.schema)
    with PgmqClient(pair.pg._url, queue="replicate_other") as other:
        setup(other, pair.d1, pair.schema)  # another deployment's capture of its own: no problem for this one
    assert finding(run(pair), "capture apps").level == "ok"
    # An older d1sync set up for another queue replaced this queue's function under the default name.
    table = pair.schema.table("apps")
    pair.sql(
        capture_function(table, "replicate_other").replace(
            "capture_public_apps__replicate_other", "capture_public_apps"
        )
    )
    f = finding(run(pair), "capture apps")
    assert f.level == "fail" and "another queue" in f.detail and "--queue replicate_data" in f.fix


def test_a_named_form_set_up_for_another_oid_or_missing_its_check_is_named(pair):
    """apps keeps a column out, so its capture takes the replicated columns by name while
    d1sync.columns_in_place says they are in place, for the table's oid written in at setup. A dump restored
    elsewhere gives the table another oid: capture then always takes the slower name-free form (a warning).
    Without columns_in_place, every write would fail (a failure)."""
    fn = function_name(pair.schema.table("apps"))
    assert finding(run(pair), "capture apps").level == "ok"
    body = pair.pg.function_source(FUNCTION_SCHEMA, fn)
    oid = named_form_table(body)
    assert oid == pair.pg.execute("SELECT 'public.apps'::regclass::oid")[0][0]
    (definition,) = pair.pg.execute(f"SELECT pg_get_functiondef('{FUNCTION_SCHEMA}.{fn}'::regproc)")[0]
    stale = oid + 100_000
    pair.sql(definition.replace(f"{oid}::pg_catalog.oid", f"{stale}::pg_catalog.oid").replace(f"'{oid}'", f"'{stale}'"))
    f = finding(run(pair), "capture apps")
    assert f.level == "warn" and "another oid" in f.detail and f.fix == "d1sync setup"
    pair.sql("ALTER TABLE apps ADD COLUMN extra int")  # only the name-free form sends it
    pair.sql("INSERT INTO apps (id, name, extra) VALUES (77, 'x', 7)")
    (m,) = pair.pg.execute("SELECT message FROM pgmq.q_replicate_data ORDER BY msg_id DESC LIMIT 1")[0]
    assert m["record"]["extra"] == 7 and "secret_note" not in m["record"]
    pair.sql("ALTER TABLE apps DROP COLUMN extra")
    setup(pair.pg, pair.d1, pair.schema)
    assert finding(run(pair), "capture apps").level == "ok"
    pair.sql(f"DROP FUNCTION {FUNCTION_SCHEMA}.columns_in_place(text, oid, text[])")
    f = finding(run(pair), "capture apps")
    assert f.level == "fail" and "every write" in f.detail and f.fix == "d1sync setup"
    setup(pair.pg, pair.d1, pair.schema)
    assert finding(run(pair), "capture apps").level == "ok"


def test_dead_letters_and_an_out_of_date_d1_schema_fail(pair):
    pair.pg.send_batch([{"type": "INSERT", "table": "apps", "record": {"id": "x"}}], queue=pair.pg.dlq)
    pair.d1.query("UPDATE _d1sync_meta SET value = 'old' WHERE key = 'schema_version'")
    dx = run(pair)
    assert finding(dx, "dead letters").level == "fail" and "apps 1" in finding(dx, "dead letters").detail
    f = finding(dx, "schema version")
    assert f.level == "fail" and "D1 has version old" in f.detail and "d1sync setup" in f.fix


def test_missing_rights_on_the_queue_and_row_level_security_name_the_grant(pair, source_db):
    role = f"d1sync_dx_{uuid.uuid4().hex[:8]}"
    pair.sql(f"CREATE ROLE {role} LOGIN")
    pair.sql(f"GRANT SELECT ON apps, app_versions TO {role}")
    pair.sql("ALTER TABLE apps ENABLE ROW LEVEL SECURITY")
    try:
        dx = run(pair, url=psycopg.conninfo.make_conninfo(source_db, user=role))
        queue = finding(dx, "queue")
        assert queue.level == "fail" and "lacks USAGE on schema pgmq" in queue.detail
        assert f"GRANT USAGE ON SCHEMA pgmq TO {role}" in queue.fix
        rls = finding(dx, "read apps")
        assert rls.level == "fail" and "row level security" in rls.detail and "BYPASSRLS" in rls.fix
        pair.sql(f"GRANT USAGE ON SCHEMA pgmq TO {role}")
        pair.sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA pgmq TO {role}")
        dx = run(pair, url=psycopg.conninfo.make_conninfo(source_db, user=role))
        assert "INSERT on" in finding(dx, "queue").detail and "DELETE on" in finding(dx, "queue").detail
        assert finding(dx, "vacuum").level == "warn"  # not the owner: autovacuum only
    finally:
        pair.sql("ALTER TABLE apps DISABLE ROW LEVEL SECURITY")
        pair.sql(f"DROP OWNED BY {role}")
        pair.sql(f"DROP ROLE {role}")


def test_no_pgmq_and_no_queue_are_found(pg_admin_url, d1_local):
    name = f"d1sync_dx_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    try:
        from d1sync_dagster.schema import load_schema
        from tests.conftest import ROOT

        schema = load_schema(ROOT / "schema.json")
        dx = diagnose(lambda: PgmqClient(url), lambda: Borrowed(d1_local), schema)
        f = finding(dx, "pgmq")
        assert f.level == "fail" and "CREATE EXTENSION pgmq" in f.fix and dx.exit_code == 1
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_unreachable_side_exits_3_and_the_other_is_still_checked(pair):
    def unreachable():
        raise QueueError("cannot connect to Postgres at postgresql://u:***@127.0.0.1:1/x: connection refused")

    dx = diagnose(unreachable, lambda: Borrowed(pair.d1), pair.schema)
    assert dx.exit_code == 3 and dx.unreachable == ["postgres"]
    assert finding(dx, "d1").level == "ok"  # D1 checked all the same
    down = HttpD1Client(account_id="a", database_id="d", api_token="t", base_url="http://127.0.0.1:1/client/v4")
    with contextlib.closing(down):
        dx = diagnose(lambda: PgmqClient(pair.pg._url), lambda: down, pair.schema)
    assert dx.exit_code == 3 and dx.unreachable == ["d1"] and finding(dx, "capture apps").level == "ok"


def test_a_rejected_token_is_a_problem_with_the_fix(source_db, d1_http, d1_standin):
    from d1sync_dagster.schema import load_schema
    from tests.conftest import ROOT

    schema = load_schema(ROOT / "schema.json")
    with PgmqClient(source_db) as pg:
        setup(pg, d1_http, schema)
    bad = HttpD1Client(
        account_id=d1_standin.account_id,
        database_id=d1_standin.database_id,
        api_token="wrong-token",
        base_url=f"{d1_standin.base_url}/client/v4",
    )
    dx = diagnose(lambda: PgmqClient(source_db), lambda: bad, schema)
    f = finding(dx, "d1")
    assert dx.exit_code == 1 and f.level == "fail" and "401" in f.detail and "D1 Edit" in f.fix
    assert "wrong-token" not in dx.table()


def test_setup_without_rights_on_pgmq_names_the_role_and_the_grant(pair, source_db):
    role = f"d1sync_dx_{uuid.uuid4().hex[:8]}"
    pair.sql(f"CREATE ROLE {role} LOGIN")
    try:
        with PgmqClient(psycopg.conninfo.make_conninfo(source_db, user=role)) as pg:
            with pytest.raises(QueueError) as e:
                setup(pg, pair.d1, pair.schema)
        message = str(e.value)
        assert "setup could not install the capture side" in message and "permission denied" in message
        assert f"Role {role} lacks USAGE and CREATE on schema pgmq" in message
        assert f"GRANT USAGE, CREATE ON SCHEMA pgmq TO {role}" in message
    finally:
        pair.sql(f"DROP OWNED BY {role}")
        pair.sql(f"DROP ROLE {role}")


def test_a_missing_queue_and_an_old_change_are_found(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'waiting')")
    dx = diagnose(lambda: PgmqClient(pair.pg._url), lambda: Borrowed(pair.d1), pair.schema, lag_threshold_seconds=-1)
    f = finding(dx, "oldest change")
    assert f.level == "warn" and "1 changes waiting" in f.detail and "sensor" in f.fix
    pair.sql("SELECT pgmq.drop_queue('replicate_data')")
    f = finding(run(pair), "queue")
    assert f.level == "fail" and "does not exist" in f.detail and f.fix.startswith("d1sync setup")
