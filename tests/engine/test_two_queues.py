"""Two deployments on one Supabase database, each with its own queue and D1 (staging and production): each
queue has capture of its own on the same tables, so setting one up, changing it or removing it leaves the
other's capture exactly as it was, and both D1 copies converge under a concurrent writer."""

import json
import threading

import psycopg
import pytest

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.doctor import capture_findings
from d1sync_dagster.engine.setup import setup, teardown_postgres
from d1sync_dagster.schema import load_schema, parse_schema
from d1sync_dagster.sql.capture import capture_function, example_source_tables, triggers
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")
CAPTURE = """
SELECT c.relname, t.tgname, t.tgenabled, p.proname, md5(p.prosrc)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
 WHERE NOT t.tgisinternal AND t.tgname LIKE 'd1sync_capture%%'
 ORDER BY 1, 2
"""


def capture_of(pg, queue):
    """The capture triggers of `queue` with their state and their function's source."""
    rows = pg.execute(CAPTURE)
    if queue == "replicate_data":
        return [r for r in rows if "__" not in r[1]]
    return [r for r in rows if r[1].endswith(f"__{queue}")]


@pytest.fixture
def two(source_db, tmp_path):
    with PgmqClient(source_db) as a, PgmqClient(source_db, queue="replicate_b") as b:
        a.execute(example_source_tables())
        d1a, d1b = LocalD1Client(str(tmp_path / "a.sqlite")), LocalD1Client(str(tmp_path / "b.sqlite"))
        setup(a, d1a, SCHEMA)
        yield a, d1a, b, d1b
        d1a.close()
        d1b.close()


def drift(pg, d1):
    return sum(diff(pg_rows(pg, t), d1_rows(d1, t)).total for t in SCHEMA.tables)


def test_setting_up_a_second_queue_leaves_the_first_ones_capture_as_it_was(two):
    a, d1a, b, d1b = two
    before = capture_of(a, "replicate_data")
    assert len(before) == 8  # four triggers on each of the two tables
    setup(b, d1b, SCHEMA)
    assert capture_of(a, "replicate_data") == before
    assert not capture_findings(a, SCHEMA) and not capture_findings(b, SCHEMA)
    a.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    assert a.metrics().queue_length == 1 and b.metrics().queue_length == 1  # each statement reaches both
    # B's deployment changes its schema.json (a column fewer): its capture changes, A's stays as it was.
    data = json.loads((ROOT / "schema.json").read_text())
    del data["apps"]["columns"]["name"]
    narrower = parse_schema(data)
    theirs = capture_of(b, "replicate_b")
    setup(b, d1b, narrower)
    assert capture_of(a, "replicate_data") == before and capture_of(b, "replicate_b") != theirs
    a.execute("UPDATE apps SET rating = 4.5 WHERE id = 1")
    (b_msg,) = b.execute("SELECT message FROM pgmq.q_replicate_b ORDER BY msg_id DESC LIMIT 1")
    (a_msg,) = a.execute("SELECT message FROM pgmq.q_replicate_data ORDER BY msg_id DESC LIMIT 1")
    assert "name" in a_msg[0]["record"] and "name" not in b_msg[0]["record"]


def test_both_copies_converge_under_a_concurrent_writer(two, source_db):
    a, d1a, b, d1b = two
    setup(b, d1b, SCHEMA)
    stop, failed, written = threading.Event(), [], [0]

    def writer():
        try:
            write()
        except BaseException as e:
            failed.append(e)

    def write():
        with psycopg.connect(source_db, autocommit=True) as conn:
            i = 0
            while not stop.is_set() and i < 60:
                i += 1
                conn.execute(
                    "INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(%s::bigint, %s::bigint) g",
                    [i * 10, i * 10 + 9],
                )
                conn.execute("UPDATE apps SET name = name || '.' WHERE id %% 7 = %s", [i % 7])
                conn.execute("DELETE FROM apps WHERE id %% 13 = %s", [i % 13])
                written[0] += 1

    w = threading.Thread(target=writer)
    w.start()
    while w.is_alive():
        apply(a, d1a, SCHEMA)
        apply(b, d1b, SCHEMA)
    w.join()
    apply(a, d1a, SCHEMA)
    apply(b, d1b, SCHEMA)
    assert not failed and written[0] == 60
    assert drift(a, d1a) == 0 and drift(b, d1b) == 0
    assert len(d1_rows(d1a, SCHEMA.table("apps"))) >= 50  # the deletes leave the last rounds
    assert d1_rows(d1a, SCHEMA.table("apps")) == d1_rows(d1b, SCHEMA.table("apps"))


def test_removing_one_queues_capture_leaves_the_others_and_it_keeps_replicating(two):
    a, d1a, b, d1b = two
    setup(b, d1b, SCHEMA)
    before = capture_of(a, "replicate_data")
    assert teardown_postgres(b, SCHEMA, drop_queue=True) == ["apps", "app_versions"]
    assert capture_of(a, "replicate_data") == before
    assert not b.execute("SELECT 1 FROM pgmq.meta WHERE queue_name LIKE 'replicate_b%%'")
    a.execute("INSERT INTO apps (id, name) VALUES (5, 'still here')")
    apply(a, d1a, SCHEMA)
    assert drift(a, d1a) == 0 and not capture_findings(a, SCHEMA)
    # And the other way round: removing the default queue's capture leaves the second one's.
    setup(b, d1b, SCHEMA)
    theirs = capture_of(b, "replicate_b")
    teardown_postgres(a, SCHEMA)
    assert capture_of(b, "replicate_b") == theirs and len(theirs) == 8
    b.execute("INSERT INTO apps (id, name) VALUES (6, 'b only')")
    assert b.metrics().queue_length == 1 and a.metrics().queue_length == 0


def test_a_second_queue_installed_by_an_older_d1sync_under_the_default_names_is_taken_over(source_db, tmp_path):
    """Before, a deployment on queue replicate_b installed capture_public_apps and d1sync_capture_* (the
    default names), replacing the default deployment's. Its setup now installs its own and drops that old copy,
    so no change is queued twice."""
    with PgmqClient(source_db, queue="replicate_b") as b:
        b.execute(example_source_tables())
        d1b = LocalD1Client(str(tmp_path / "b.sqlite"))
        setup(b, d1b, SCHEMA)
        for t in SCHEMA.tables:  # what the older d1sync left: this queue's function under the default names
            old = capture_function(t, "replicate_b").replace(
                f"capture_public_{t.name}__replicate_b", f"capture_public_{t.name}"
            )
            b.execute(old)
            b.execute(triggers(t))
        b.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
        assert b.metrics().queue_length == 2  # queued twice
        b.execute("SELECT pgmq.purge_queue('replicate_b')")
        setup(b, d1b, SCHEMA)
        b.execute("INSERT INTO apps (id, name) VALUES (2, 'y')")
        assert b.metrics().queue_length == 1
        names = {r[0] for r in b.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'd1sync_capture%%'")}
        assert names == {f"d1sync_capture_{e}__replicate_b" for e in ("insert", "update", "delete", "truncate")}
        d1b.close()
