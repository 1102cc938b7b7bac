"""Row level security: a role that sees a filtered view of a replicated table is refused by backfill,
verify and the row-count check, naming the table and the fix; it never calls a filtered view in sync."""

import uuid

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.catalog import check_reads_every_row
from d1sync_dagster.engine.health import table_health
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.errors import QueueError


@pytest.fixture
def filtered(pair, source_db):
    """1,000 rows replicated; a least-privilege role whose policy shows it 10 of them."""
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 1000) g")
    pair.apply()
    role = f"d1sync_rls_{uuid.uuid4().hex[:8]}"
    pair.sql(f"CREATE ROLE {role} LOGIN")
    pair.sql(f"GRANT USAGE ON SCHEMA pgmq, d1sync TO {role}")
    pair.sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq, d1sync TO {role}")
    pair.sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {role}")
    pair.sql(f"GRANT SELECT ON apps, app_versions TO {role}")
    pair.sql("ALTER TABLE apps ENABLE ROW LEVEL SECURITY")
    pair.sql(f"CREATE POLICY only_ten ON apps FOR SELECT TO {role} USING (id <= 10)")
    try:
        with PgmqClient(psycopg.conninfo.make_conninfo(source_db, user=role)) as pg:
            assert pg.execute("SELECT count(*) FROM apps")[0][0] == 10  # what the role would copy
            yield pair, pg, role
    finally:
        pair.sql("DROP POLICY only_ten ON apps")
        pair.sql("ALTER TABLE apps DISABLE ROW LEVEL SECURITY")
        pair.sql(f"DROP OWNED BY {role}")
        pair.sql(f"DROP ROLE {role}")


def test_backfill_and_verify_refuse_a_filtered_view_and_name_the_fix(filtered):
    pair, pg, role = filtered
    depth = pair.queue_depth()
    for run in (
        lambda: backfill(pg, pair.d1, pair.schema, tables=["apps"]),
        lambda: reconcile(pg, pair.d1, pair.schema, tables=["apps"], repair_drift=True),
    ):
        with pytest.raises(QueueError) as e:
            run()
        message = str(e.value)
        assert '"public"."apps"' in message and role in message and "BYPASSRLS" in message
        assert "CREATE POLICY" in message
    assert pair.queue_depth() == depth  # nothing was enqueued
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 1000}]  # and nothing in D1 was touched


def test_the_row_count_check_fails_instead_of_counting_a_filtered_view(filtered):
    pair, pg, role = filtered
    health = table_health(pg, pair.d1, pair.schema)
    apps = health["apps"]
    assert apps.source_rows == 10 and not apps.count_explained and role in (apps.filtered or "")
    assert health["app_versions"].filtered is None  # no row level security there


def test_a_role_that_bypasses_row_level_security_reads_every_row(filtered):
    pair, pg, role = filtered
    pair.sql(f"ALTER ROLE {role} BYPASSRLS")
    check_reads_every_row(pg, pair.schema.table("apps"), doing="copy")  # no error now
    assert pg.execute("SELECT count(*) FROM apps")[0][0] == 1000
