"""Incremental apply through real Postgres + PGMQ and both D1 backends: D1 ends equal to Postgres."""

import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.maintenance import vacuum_queue
from tests.conftest import ROOT

UUID = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"


def test_inserts_updates_deletes(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' || g FROM generate_series(1, 300) g")
    pair.sql("UPDATE apps SET name = 'changed', rating = 2.5 WHERE id % 3 = 0")
    pair.sql("DELETE FROM apps WHERE id % 5 = 0")
    report = pair.apply()
    assert report.drained and report.dead_lettered == 0
    assert pair.queue_depth() == 0
    pair.assert_in_sync()
    apps = report.tables["apps"]
    assert apps.messages == 300 + 100 + 60
    assert apps.upserts == 240 and apps.deletes == 60  # coalesced: net rows, not messages


def test_many_batches_keep_order(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 50) g")
    for i in range(5):
        pair.sql("UPDATE apps SET name = %s", [f"v{i}"])
    report = pair.apply(batch_size=7)
    assert report.batches == 6  # a page of 7 reads on to the end of its transaction: one batch each
    pair.assert_in_sync()


def test_a_run_ends_at_the_backlog_it_found_while_writes_keep_coming(pair, source_db):
    """Writers as fast as the apply: after every batch's D1 commit, a new change commits. The run applies the
    backlog it found and ends (it used to follow such writers for as long as they wrote: a Dagster run or
    `d1sync apply` that never ended); its position covers that backlog and none of what came after."""
    from d1sync_dagster.core.txns import Snapshot

    insert = "INSERT INTO apps (id, name) VALUES (%s, 'a') RETURNING pg_current_xact_id()::text::bigint"
    backlog = [pair.sql(insert, [i])[0][0] for i in range(1, 41)]  # 40 transactions: 8 batches of 5
    later: list[int] = []
    with psycopg.connect(source_db, autocommit=True) as writer:

        def more(_ids: list[int]) -> None:
            if len(later) < 200:  # bounded: a regression fails here instead of running for ever
                with writer.transaction():
                    row = writer.execute(insert, [1000 + len(later)]).fetchone()
                later.append(row[0])

        report = apply(pair.pg, pair.d1, pair.schema, ApplyOptions(batch_size=5), after_d1_commit=more)
    assert report.caught_up and not report.drained
    assert 40 <= report.messages < 40 + len(later) and len(later) < 200
    assert pair.queue_depth() == 40 + len(later) - report.messages  # what came since waits in the queue
    position = Snapshot.parse(report.position)
    assert all(position.visible(x) for x in backlog) and not any(position.visible(x) for x in later)
    # with the writer gone, the next run drains the queue
    final = pair.apply()
    assert final.drained and not final.caught_up and pair.queue_depth() == 0
    pair.assert_in_sync()


def test_delete_then_reinsert_of_a_key(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'first')")
    pair.apply()
    pair.sql("DELETE FROM apps WHERE id = 1")
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'second')")
    pair.apply()
    pair.assert_in_sync()
    pair.sql("INSERT INTO apps (id, name) VALUES (2, 'x')")
    pair.sql("DELETE FROM apps WHERE id = 2")  # insert-then-delete in one batch is a delete
    report = pair.apply()
    assert report.tables["apps"].upserts == 0 and report.tables["apps"].deletes == 1
    pair.assert_in_sync()


def test_fifty_updates_of_one_row_are_one_d1_write(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'x')")
    pair.apply()
    for i in range(50):
        pair.sql("UPDATE apps SET name = %s WHERE id = 1", [f"v{i}"])
    report = pair.apply()
    apps = report.tables["apps"]
    assert apps.messages == 50 and apps.upserts == 1 and apps.statements == 1
    assert apps.rows_written == 1
    pair.assert_in_sync()


def test_replaying_unchanged_rows_writes_nothing(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 20) g")
    pair.apply()
    # The seed's backfill snippet re-sends every row as an INSERT; rows already right cost no D1 write.
    pair.sql(SEED_BACKFILL)
    report = pair.apply()
    assert report.tables["apps"].messages == 20 and report.tables["apps"].rows_written == 0
    pair.assert_in_sync()


def test_primary_key_change_removes_the_old_row(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (2, 'b'), (1, 'a')")
    pair.apply()
    pair.sql("UPDATE apps SET id = id + 1")
    pair.sql("UPDATE apps SET id = 100 WHERE id = 3")
    pair.apply()
    pair.assert_in_sync()
    (res,) = pair.d1.query("SELECT id FROM apps ORDER BY id")
    assert [r["id"] for r in res.results] == [2, 100]


def test_composite_keys(pair):
    pair.sql(
        "INSERT INTO app_versions (app_id, version, downloads) SELECT g % 5, 'v' || g, g FROM generate_series(1, 100) g"
    )
    pair.sql("UPDATE app_versions SET downloads = downloads * 2 WHERE app_id = 1")
    pair.sql("DELETE FROM app_versions WHERE app_id = 2")
    pair.sql("UPDATE app_versions SET version = version || '-renamed' WHERE app_id = 3")
    report = pair.apply()
    assert report.dead_lettered == 0
    pair.assert_in_sync()


def test_truncate_between_writes(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'before' FROM generate_series(1, 10) g")
    pair.apply()
    pair.sql("INSERT INTO apps (id, name) VALUES (11, 'lost')")
    pair.sql("TRUNCATE apps")
    pair.sql("INSERT INTO apps (id, name) VALUES (3, 'after')")
    report = pair.apply()
    assert report.tables["apps"].truncates == 1
    pair.assert_in_sync()
    (res,) = pair.d1.query("SELECT id, name FROM apps")
    assert res.results == [{"id": 3, "name": "after"}]


EDGE_ROWS = [
    (
        1,
        None,
        "",
        True,
        '{"nested": {"deep": [1, 2.5, null, "x"], "b": true}, "a": "ü"}',
        0.1,
        "\\x",
        "2024-02-29T12:34:56Z",
    ),
    (9223372036854775807, UUID, "unicode ñ 表 🚀", False, "[]", -1.5e300, "\\xdeadbeef00ff", "1970-01-01T00:00:00Z"),
    (-9223372036854775808, None, 'it\'s "quoted" ; -- not sql', None, "null", None, None, "1969-12-31T23:59:59.5Z"),
    (
        9007199254740993,
        None,
        "emoji 👩‍👩‍👧",
        True,
        '{"big": 9007199254740993, "f": 1.0000000000000002}',
        5e-324,
        "\\x00",
        "2262-04-11T23:47:16Z",
    ),
]


def test_every_type_with_edge_values(pair):
    for row in EDGE_ROWS:
        pair.sql(
            "INSERT INTO apps (id, owner_id, name, is_public, settings, rating, icon, created_at) "
            "VALUES (%s, %s, %s, coalesce(%s, false), %s::jsonb, %s, %s::bytea, %s::timestamptz)",
            list(row),
        )
    report = pair.apply()
    assert report.dead_lettered == 0, pair.dead_letters()
    pair.assert_in_sync()
    (res,) = pair.d1.query(
        "SELECT CAST(id AS TEXT) AS id, owner_id, settings, hex(icon) AS icon, created_at FROM apps ORDER BY id"
    )
    by_id = {r["id"]: r for r in res.results}
    assert by_id["9223372036854775807"]["owner_id"] == UUID.lower()
    assert by_id["9223372036854775807"]["icon"] == "DEADBEEF00FF"
    assert by_id["1"]["settings"] == '{"a":"ü","nested":{"b":true,"deep":[1,2.5,null,"x"]}}'
    assert by_id["9007199254740993"]["settings"] == '{"big":9007199254740993,"f":1.0000000000000002}'
    assert by_id["1"]["created_at"] == 1709210096
    assert by_id["-9223372036854775808"]["created_at"] == -1


SEED_BACKFILL = """
WITH payloads AS (
  SELECT jsonb_build_object(
    'record', to_jsonb(av.*),
    'old_record', '{}',
    'type', 'INSERT',
    'table', 'apps'
  ) AS msg
  FROM apps av
),
batched AS (
  SELECT array_agg(msg) AS msgs FROM payloads
)
SELECT COUNT(*) AS messages_sent
FROM pgmq.send_batch(
  queue_name => 'replicate_data',
  msgs       => (SELECT msgs FROM batched)
);
"""


def test_seed_message_formats_apply(pair):
    """The seed's per-row trigger (full row, old_record {} or the old row) and its backfill snippet."""
    pair.sql("ALTER TABLE apps DISABLE TRIGGER USER")
    pair.sql("INSERT INTO apps (id, name, secret_note) VALUES (1, 'a', 's'), (2, 'b', 's'), (3, 'c', 's')")
    pair.sql(SEED_BACKFILL)
    pair.sql(
        """SELECT pgmq.send_batch('replicate_data', ARRAY[
             jsonb_build_object('record', to_jsonb(a), 'old_record', '{}'::jsonb, 'type', 'INSERT', 'table', 'apps'),
             jsonb_build_object('record', to_jsonb(a), 'old_record', to_jsonb(a), 'type', 'UPDATE', 'table', 'apps'),
             jsonb_build_object('record', NULL, 'old_record', to_jsonb(b), 'type', 'DELETE', 'table', 'apps')])
           FROM apps a, apps b WHERE a.id = 1 AND b.id = 2"""
    )
    pair.sql("DELETE FROM apps WHERE id = 2")
    pair.sql("ALTER TABLE apps ENABLE TRIGGER USER")
    report = pair.apply()
    assert report.dead_lettered == 0, pair.dead_letters()
    pair.assert_in_sync()


def test_poison_goes_to_the_dead_letter_queue_and_the_rest_applies(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'good')")
    pair.pg.send_batch(
        [
            {"type": "INSERT", "table": "no_such_table", "record": {"id": 1}, "old_record": None},
            {"type": "INSERT", "table": "apps", "record": {"name": "no key"}, "old_record": None},
            {"type": "INSERT", "table": "apps", "record": {"id": "not a number", "name": "x"}, "old_record": None},
            {"type": "UPSERT", "table": "apps", "record": {"id": 5}},
            "just a string",
            {
                "type": "INSERT",
                "table": "apps",
                "record": {
                    "id": 7,
                    "name": "x",
                    "owner_id": None,
                    "is_public": "maybe",
                    "settings": None,
                    "rating": None,
                    "icon": None,
                    "created_at": None,
                },
            },
        ]
    )
    pair.sql("INSERT INTO apps (id, name) VALUES (2, 'also good')")
    report = pair.apply()
    assert report.dead_lettered == 6 and pair.queue_depth() == 0
    letters = pair.dead_letters()
    reasons = [m["error"] for m in letters]
    assert "table 'no_such_table' is not in schema.json" in reasons[0]
    assert "record lacks replicated column" in reasons[1] or "no value for primary key" in reasons[1]
    assert "INTEGER column got text" in reasons[2]
    assert "unknown change type 'UPSERT'" in reasons[3]
    assert "message is a JSON str" in reasons[4]
    assert "BOOLEAN column" in reasons[5]
    assert letters[4]["message"] == "just a string"  # the original is kept whole
    assert all(m["msg_id"] and m["enqueued_at"] for m in letters)
    pair.assert_in_sync()


def test_a_change_d1_refuses_is_isolated_and_dead_lettered(pair):
    # D1's table drifted from schema.json: a CHECK constraint the source does not have.
    pair.d1.query("DROP TABLE apps")
    pair.d1.query(
        'CREATE TABLE apps ("id" INTEGER NOT NULL, "owner_id" TEXT, "name" TEXT CHECK (length(name) < 10), '
        '"is_public" INTEGER, "settings" TEXT, "rating" REAL, "icon" BLOB, "created_at" INTEGER, PRIMARY KEY ("id"))'
    )
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'ok' FROM generate_series(1, 40) g")
    pair.sql("INSERT INTO apps (id, name) VALUES (41, 'this name is far too long')")
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'ok' FROM generate_series(42, 60) g")
    report = pair.apply()
    assert report.dead_lettered == 1 and pair.queue_depth() == 0
    (letter,) = pair.dead_letters()
    assert "CHECK constraint failed" in letter["error"] and letter["message"]["record"]["id"] == 41
    (res,) = pair.d1.query("SELECT count(*) AS n FROM apps")
    assert res.results == [{"n": 59}]


def test_large_rows_are_split_within_d1_limits(pair):
    big = "x" * 30_000
    pair.sql("INSERT INTO apps (id, name) SELECT g, %s FROM generate_series(1, 20) g", [big])
    pair.sql("INSERT INTO apps (id, name) VALUES (21, %s)", ["y" * 150_000])  # over 100 KB: bound, alone
    report = pair.apply()
    assert report.dead_lettered == 0
    assert report.tables["apps"].statements >= 8
    pair.assert_in_sync()


def test_row_over_d1_row_limit_is_dead_lettered(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, %s)", ["z" * 2_100_000])
    pair.sql("INSERT INTO apps (id, name) VALUES (2, 'fine')")
    report = pair.apply()
    assert report.dead_lettered == 1
    assert "2000000-byte row limit" in pair.dead_letters()[0]["error"]
    (res,) = pair.d1.query("SELECT id FROM apps")
    assert res.results == [{"id": 2}]


def test_second_apply_exits_cleanly_while_one_runs(pair, source_db):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'x')")
    with PgmqClient(source_db) as holder, holder.consumer_lock() as got:
        assert got
        report = pair.apply()
    assert report.skipped == "another apply is running on this queue" and report.messages == 0
    assert pair.queue_depth() == 1


def test_budget_stops_early_and_the_next_run_finishes(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 100) g")
    pair.sql("UPDATE apps SET name = 'm'")
    first = pair.apply(batch_size=30, max_messages=60)
    # the budget counts whole transactions: the page of 30 reads on to the end of the INSERT's 100
    assert first.messages == 100 and not first.drained
    second = pair.apply()
    assert second.drained and first.messages + second.messages == 200
    pair.assert_in_sync()


class Crash(Exception):
    pass


def test_crash_between_d1_commit_and_queue_delete_replays_harmlessly(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 50) g")
    pair.sql("UPDATE apps SET name = 'later' WHERE id <= 10")

    def die(ids):
        raise Crash(f"killed after D1 committed {len(ids)} messages")

    with pytest.raises(Crash):
        apply(pair.pg, pair.d1, pair.schema, ApplyOptions(vt_seconds=0), after_d1_commit=die)
    assert pair.queue_depth() == 60  # nothing deleted
    pair.sql("DELETE FROM apps WHERE id = 5")
    report = pair.apply()
    assert report.messages == 61 and report.dead_lettered == 0
    pair.assert_in_sync()


def test_batch_hidden_by_a_dead_consumer_is_not_overtaken(pair):
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'v1')")
    pair.sql("UPDATE apps SET name = 'v2'")
    pair.pg.read(vt=600, qty=1)  # a consumer read the INSERT, then died: hidden for 10 minutes
    pair.sql("UPDATE apps SET name = 'v3'")
    report = pair.apply()
    assert report.messages == 3
    pair.assert_in_sync()  # the old INSERT did not land last


def test_a_consumer_killed_mid_batch_leaves_nothing_out_of_order_and_nothing_to_wait_for(local_pair, source_db):
    """A real process is killed (SIGKILL) between a batch's D1 commit and its delete, with newer changes to the
    same rows queued behind it; the next apply starts at once (no visibility timeout to wait out, whatever
    the killed run's --vt) and replays in order."""
    pair = local_pair  # the child process writes the same local D1 file
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'v1' FROM generate_series(1, 40) g")
    pair.sql("UPDATE apps SET name = 'v2' WHERE id <= 20")
    pair.sql("DELETE FROM apps WHERE id > 35")
    code = (
        "import os, signal, sys\n"
        "from d1sync_dagster.clients.d1_local import LocalD1Client\n"
        "from d1sync_dagster.clients.pgmq import PgmqClient\n"
        "from d1sync_dagster.engine.apply import ApplyOptions, apply\n"
        "from d1sync_dagster.schema import load_schema\n"
        "def die(ids):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "with PgmqClient(sys.argv[1]) as pg:\n"
        "    options = ApplyOptions(batch_size=1, vt_seconds=3600)\n"
        "    apply(pg, LocalD1Client(sys.argv[2]), load_schema(sys.argv[3]), options, after_d1_commit=die)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, source_db, str(pair.d1.path), str(ROOT / "schema.json")], cwd=ROOT, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    assert pair.queue_depth() == 65  # nothing was deleted
    # the first batch landed: the first transaction whole (40 rows), though the batch size is 1
    assert pair.d1.query("SELECT count(*) AS n FROM apps")[0].results == [{"n": 40}]
    started = time.monotonic()
    report = pair.apply()
    assert report.messages == 65 and report.drained
    assert time.monotonic() - started < 30  # nothing hidden for the --vt of the dead run (an hour)
    pair.assert_in_sync()


def test_reads_do_not_rewrite_messages(pair):
    """apply reads without pgmq.read's visibility update: the queue table sees each message inserted and
    deleted, never updated, and what a run leaves queued is untouched (read_ct 0, visible to any reader)."""
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'n' FROM generate_series(1, 30) g")
    pair.sql("UPDATE apps SET name = 'm'")
    pair.sql("SELECT pg_stat_reset()")
    report = pair.apply(batch_size=1, max_messages=1)
    assert report.messages == 30  # one page: the first transaction, whole
    # The apply's own connection reports its counts when it next goes idle, up to a second later (Postgres
    # flushes a backend's statistics at most once a second): wait for them, then compare exactly.
    deadline = time.monotonic() + 10
    while True:
        pair.sql("SELECT pg_stat_clear_snapshot()")
        ((updated, deleted),) = pair.sql(
            "SELECT n_tup_upd, n_tup_del FROM pg_stat_user_tables "
            "WHERE schemaname = 'pgmq' AND relname = 'q_replicate_data'"
        )
        if deleted >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (updated, deleted) == (0, 30)
    assert pair.sql("SELECT count(*), max(read_ct), bool_and(vt <= now()) FROM pgmq.q_replicate_data") == [
        (30, 0, True)
    ]


def test_a_change_that_commits_late_below_ids_already_read_is_not_lost_or_reordered(pair, source_db):
    """A transaction takes its msg_id, then commits after later ones were applied; the later transaction
    touching the same row waits for it (row lock), so its change is newer and must land last."""
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'a'), (2, 'b')")
    pair.apply()
    with psycopg.connect(source_db) as slow:
        slow.execute("UPDATE apps SET name = 'slow' WHERE id = 1")  # msg_id taken, not committed
        pair.sql("UPDATE apps SET name = 'fast' WHERE id = 2")  # a higher msg_id, committed first
        assert pair.apply().messages == 1
        slow.commit()
    pair.sql("UPDATE apps SET name = 'after' WHERE id = 1")
    report = pair.apply()
    assert report.messages == 2
    pair.assert_in_sync()
    assert pair.d1.query("SELECT name FROM apps ORDER BY id")[0].results == [{"name": "after"}, {"name": "fast"}]


def test_update_of_a_row_missing_in_d1_restores_it(pair):
    """The seed's UPDATE did nothing when D1 lacked the row (silent drift); an upsert puts it back."""
    pair.sql("INSERT INTO apps (id, name) VALUES (1, 'a'), (2, 'b')")
    pair.apply()
    pair.d1.query("DELETE FROM apps WHERE id = 1")
    pair.sql("UPDATE apps SET name = 'a2' WHERE id = 1")
    pair.apply()
    pair.assert_in_sync()


def _dead_rows_counted(pg, at_least: int) -> None:
    """Wait until Postgres's statistics show the queue's dead rows (backends report them within a second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = pg.execute(f"SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'pgmq.q_{pg.queue}'::regclass")
        if rows and rows[0][0] >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError("the queue's dead rows were never counted")


def test_a_drained_queue_table_is_vacuumed_once_it_holds_enough_dead_rows(pair):
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'x' FROM generate_series(1, 3000) g")
    report = pair.apply(vacuum_dead_rows=None)
    assert report.drained and not report.vacuumed
    _dead_rows_counted(pair.pg, 3000)
    pair.sql("UPDATE apps SET name = 'y' WHERE id <= 10")
    report = pair.apply(vacuum_dead_rows=1000)
    assert report.vacuumed
    (vacuums,) = pair.sql(
        f"SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'pgmq.q_{pair.pg.queue}'::regclass"
    )
    assert vacuums[0] >= 1
    pair.assert_in_sync()


def test_a_role_that_does_not_own_the_queue_leaves_it_to_autovacuum(pair, source_db, caplog):
    role = f"d1sync_t_{uuid.uuid4().hex[:8]}"
    pair.sql(f"CREATE ROLE {role} LOGIN")
    pair.sql(f"GRANT USAGE ON SCHEMA pgmq TO {role}")
    try:
        pair.sql("INSERT INTO apps (id, name) SELECT g, 'x' FROM generate_series(1, 500) g")
        pair.apply(vacuum_dead_rows=None)
        _dead_rows_counted(pair.pg, 500)
        with PgmqClient(psycopg.conninfo.make_conninfo(source_db, user=role)) as other:
            assert vacuum_queue(other, 100) is False
        assert "only its owner can vacuum it" in caplog.text
        assert vacuum_queue(pair.pg, 100) is True  # the owner can
    finally:
        pair.sql(f"DROP OWNED BY {role}")
        pair.sql(f"DROP ROLE {role}")
