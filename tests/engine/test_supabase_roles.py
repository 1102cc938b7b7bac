"""Roles laid out like Supabase's: pgmq owned by an admin (here the superuser), a non-superuser owner of the
application tables (a member of pg_monitor, like Supabase's `postgres`) that runs setup, apply and verify, and
an application role that only writes rows. Then the pause/restore case: the queue table changes owner and
the owner's rights on it are gone, so every application write fails inside the capture trigger, which
`status` and `doctor` must say."""

import uuid

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.doctor import capture_findings, diagnose
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")


@pytest.fixture
def roles(source_db):
    tag = uuid.uuid4().hex[:8]
    owner, app = f"d1sync_owner_{tag}", f"d1sync_app_{tag}"
    db = psycopg.conninfo.conninfo_to_dict(source_db)["dbname"]
    with psycopg.connect(source_db, autocommit=True) as conn:
        for sql in (
            f"CREATE ROLE {owner} LOGIN",
            f"GRANT pg_monitor TO {owner}",
            f"CREATE ROLE {app} LOGIN",
            f'GRANT CREATE ON DATABASE "{db}" TO {owner}',
            f"GRANT USAGE, CREATE ON SCHEMA pgmq TO {owner}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO {owner}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {owner}",
            f"ALTER TABLE apps OWNER TO {owner}",
            f"ALTER TABLE app_versions OWNER TO {owner}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON apps TO {app}",
        ):
            conn.execute(sql)
    try:
        yield (
            psycopg.conninfo.make_conninfo(source_db, user=owner),
            psycopg.conninfo.make_conninfo(source_db, user=app),
            owner,
        )
    finally:
        with psycopg.connect(source_db, autocommit=True) as conn:
            for role in (app, owner):
                conn.execute(f"DROP OWNED BY {role} CASCADE")
                conn.execute(f"DROP ROLE {role}")


def test_a_non_superuser_owner_sets_up_applies_and_verifies(roles, d1_local, source_db):
    owner_url, app_url, owner = roles
    with PgmqClient(owner_url) as pg:
        setup(pg, d1_local, SCHEMA)
        with psycopg.connect(app_url, autocommit=True) as app:  # the application writes, nothing more
            app.execute("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 40) g")
            app.execute("UPDATE apps SET name = 'x' WHERE id <= 10")
            app.execute("DELETE FROM apps WHERE id = 40")
        report = apply(pg, d1_local, SCHEMA)
        assert report.messages > 0 and report.dead_lettered == 0
        assert reconcile(pg, d1_local, SCHEMA).in_sync
        dx = diagnose(lambda: PgmqClient(owner_url), lambda: d1_local, SCHEMA)
        assert dx.exit_code == 0, dx.table()

        # The queue table changes hands and the owner's rights on it are gone (a pause and restore).
        with psycopg.connect(source_db, autocommit=True) as admin:
            admin.execute("ALTER TABLE pgmq.q_replicate_data OWNER TO postgres")
            admin.execute(f"REVOKE ALL ON pgmq.q_replicate_data FROM {owner}")
        with psycopg.connect(app_url, autocommit=True) as app, pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("INSERT INTO apps (id, name) VALUES (100, 'lost')")  # the capture trigger fails
        problems = {f.check: f for f in capture_findings(pg, SCHEMA)}
        broken = problems["capture apps"]
        assert broken.level == "fail" and "every write to" in broken.detail and "GRANT INSERT" in broken.fix
