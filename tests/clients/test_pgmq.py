"""The PGMQ client against real Postgres with PGMQ installed from the pgmq package's SQL."""

import os
import time

import pytest

from d1sync_dagster.clients.pgmq import PgmqClient, is_pooled, redact
from d1sync_dagster.errors import QueueError


@pytest.fixture
def pg(pg_url):
    with PgmqClient(pg_url, queue="q_test") as client:
        client.execute("SELECT pgmq.create('q_test')")
        yield client


def test_send_read_delete_in_msg_id_order(pg):
    ids = pg.send_batch([{"n": i} for i in range(5)])
    assert ids == sorted(ids) and len(ids) == 5
    msgs = pg.read(vt=30, qty=10)
    assert [m.msg_id for m in msgs] == ids
    assert [m.message for m in msgs] == [{"n": i} for i in range(5)]
    assert all(m.read_ct == 1 for m in msgs)
    assert pg.read(vt=30, qty=10) == []  # hidden by the visibility timeout
    assert pg.delete(ids[:2]) == ids[:2]
    assert pg.metrics().queue_length == 3


def test_visibility_timeout_zero_makes_messages_readable_again(pg):
    pg.send_batch([{"a": 1}])
    assert len(pg.read(vt=0, qty=1)) == 1
    (again,) = pg.read(vt=30, qty=1)
    assert again.read_ct == 2


def test_archive_moves_messages_out_of_the_queue(pg):
    ids = pg.send_batch([{"a": 1}, {"a": 2}])
    assert pg.archive(ids) == ids
    assert pg.metrics().queue_length == 0
    assert pg.execute("SELECT count(*) FROM pgmq.a_q_test")[0][0] == 2


def test_metrics_report_depth_and_age(pg):
    m = pg.metrics()
    assert (m.queue_name, m.queue_length, m.oldest_msg_age_sec) == ("q_test", 0, None)
    pg.send_batch([{"a": 1}])
    m = pg.metrics()
    assert m.queue_length == 1 and m.oldest_msg_age_sec is not None and m.total_messages == 1


def test_purge_empties_the_queue(pg):
    pg.send_batch([{"a": i} for i in range(3)])
    assert pg.purge() == 3
    assert pg.metrics().queue_length == 0


def test_empty_id_lists_do_nothing(pg):
    assert pg.delete([]) == [] and pg.archive([]) == [] and pg.send_batch([]) == [] and pg.finish([]) == 0


def test_finish_deletes_applied_messages_and_counts_those_still_there(pg):
    ids = pg.enqueue([{"n": i} for i in range(6)])
    assert pg.finish(ids[:3]) == 3
    assert pg.finish(ids[:4]) == 1  # three were gone already
    assert [m.msg_id for m in pg.read_in_order(10)] == ids[4:]
    assert pg.metrics().queue_length == 2  # pgmq.metrics sees what finish left


def test_consumer_lock_excludes_a_second_consumer_and_says_who_holds_it(pg, pg_url):
    with PgmqClient(pg_url, queue="q_test") as other, PgmqClient(pg_url, queue="q_other") as elsewhere:
        with pg.consumer_lock() as got:
            assert got
            with elsewhere.consumer_lock() as got_elsewhere:
                assert got_elsewhere  # another queue's lock is another lock
            pg.check_consumer_lock()  # held, by the lock's own backend
            with other.consumer_lock() as got_other:
                assert not got_other
                other.check_consumer_lock()  # not taken: nothing to prove
            ((pid, app, since),) = other.lock_holders()
            assert pid != other.execute("SELECT pg_backend_pid()")[0][0]
            assert app == f"d1sync consumer of {pg.queue} (pid {os.getpid()})" and since is not None
        assert other.lock_holders() == []
        with other.consumer_lock() as got_after:
            assert got_after


def test_the_lock_connection_is_kept_between_calls_and_replaced_when_it_died(pg, pg_url):
    with PgmqClient(pg_url, queue="q_test") as consumer:
        with consumer.consumer_lock() as got:
            assert got
            ((first, _, _),) = pg.lock_holders()
        with consumer.consumer_lock() as got:
            assert got and pg.lock_holders()[0][0] == first  # one connection, not one per call
        pg.execute("SELECT pg_terminate_backend(%s)", [first])  # the server drops it while it is idle
        with consumer.consumer_lock() as got:
            assert got and pg.lock_holders()[0][0] != first
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [first]) == [(0,)]


def test_the_lock_transaction_has_no_idle_timeout_and_no_snapshot(pg, pg_url):
    with PgmqClient(pg_url) as admin:
        (db,) = admin.execute("SELECT current_database()")[0]
        admin.execute(f"ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '200ms'")
    with PgmqClient(pg_url, queue="q_test") as consumer, consumer.consumer_lock() as got:
        assert got
        time.sleep(0.6)  # longer than the database's idle-in-transaction timeout
        consumer.check_consumer_lock()
        ((xid, snapshot),) = pg.execute(
            "SELECT backend_xid, backend_xmin FROM pg_stat_activity WHERE pid = %s", [consumer.lock_holders()[0][0]]
        )
        assert xid is None and snapshot is None  # holds back no vacuum


def test_pooler_url_is_recognised():
    assert is_pooled("postgresql://u:p@db.example.com:6543/postgres")
    assert not is_pooled("postgresql://u:p@db.example.com:5432/postgres")


def test_unreachable_postgres_error_hides_the_password():
    with pytest.raises(QueueError) as e:
        PgmqClient("postgresql://user:hunter2secret@127.0.0.1:1/db", connect_timeout=2)
    assert "hunter2secret" not in str(e.value)
    assert "***" in str(e.value) and "cannot connect" in str(e.value)


def test_redact_hides_passwords_in_urls_and_keyword_strings():
    assert redact("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert "pw" not in redact("host=h password=pw user=u")


def test_enqueue_keeps_order_and_the_queue_methods_see_the_messages(pg):
    from d1sync_dagster.core import messages

    shapes = [
        {"type": "INSERT", "table": "a", "record": {"id": 1}},
        messages.range_marker("a", None, ["9"], 9),
        messages.chunk("b", ["id"], [[1], [2], [3]]),
        messages.records_chunk("b", [{"id": 4}, {"id": 5}]),
        {"type": "TRUNCATE", "table": "b"},
        {"type": "BACKFILL", "table": "b", "rows": "many"},
    ]
    ids = pg.enqueue(shapes)
    assert ids == sorted(ids) and len(ids) == 6
    assert [m.message for m in pg.read(vt=30, qty=10)] == shapes  # msg_id order is the given order
    assert pg.contains(ids[0]) and not pg.contains(ids[-1] + 1)
    queued = pg.queued_by_table()
    # Row changes counted inside Postgres exactly as core.messages.message_rows counts them in Python.
    for table in ("a", "b"):
        n, rows, truncate, age = queued[table]
        mine = [m for m in shapes if m["table"] == table]
        assert n == len(mine) and rows == sum(messages.message_rows(m) for m in mine)
        assert truncate == (table == "b") and age is not None and age >= 0
    pg.release(ids[:2])
    assert [m.msg_id for m in pg.read(vt=30, qty=10)] == ids[:2]  # visible again at once
    assert pg.delete_for_tables(["a"]) == 2 and pg.metrics().queue_length == 4
    pg.execute("SELECT pgmq.create(%s)", [pg.dlq])
    pg.dead_letter([(ids[2], "bad", "b")])
    assert pg.dead_letters_by_table() == {"b": 1}


def test_the_pgmq_install_is_reported(pg):
    # The tests install PGMQ from its SQL file (no extension); Supabase reports "<version> (extension)".
    assert pg.pgmq_install() == "SQL install"


def test_span_bounds_the_queue_from_above_without_counting_it(pg):
    assert pg.span() == 0
    ids = pg.send_batch([{"n": i} for i in range(10)])
    assert pg.span() == 10
    pg.delete(ids[3:7])  # applied out of order: the span still covers the ends
    assert pg.span() == 10 and pg.metrics().queue_length == 6
    pg.delete([ids[0], ids[-1]])
    assert pg.span() == 8
