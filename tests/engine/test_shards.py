"""One table split over several D1 databases (real Postgres + PGMQ, local D1 files and the HTTP stand-in):
by an explicit tenant map over 3 shards and by hash over 4, under concurrent writers that move rows between
shards, with TRUNCATE, backfill, a reconcile that repairs drift planted in one shard, and growth from 4 to
6 shards while writes go on. After every drain each shard holds exactly the Postgres rows its rule routes
there, and no row is anywhere else."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import psycopg
import pytest

from d1sync_dagster.clients.d1_local import LocalD1Client
from d1sync_dagster.clients.d1_shards import ShardedD1
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core import messages
from d1sync_dagster.core.shards import rule_from_json
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.health import d1_row_counts
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.engine.status import status
from d1sync_dagster.errors import ConfigError
from d1sync_dagster.schema import parse_schema

SCHEMA = parse_schema(
    {
        "devices": {
            "primaryKey": "id",
            "columns": {"id": "INTEGER", "tenant": "TEXT", "name": "TEXT", "n": "INTEGER"},
            "indexes": [["tenant"]],
        },
        "notes": {"primaryKey": "id", "columns": {"id": "INTEGER", "body": "TEXT"}},
    }
)
TABLES = """
CREATE TABLE devices (id bigint PRIMARY KEY, tenant text, name text, n integer);
CREATE TABLE notes (id bigint PRIMARY KEY, body text);
"""
TENANTS = [f"t{i}" for i in range(40)]
MAP = {"column": "tenant", "map": {"t0": "eu", "t1": "us", "t2": "ap", "t3": "us"}, "default": "eu"}
HASH4 = {"column": "tenant", "hash": ["s0", "s1", "s2", "s3"]}
HASH6 = {"column": "tenant", "hash": ["s0", "s1", "s2", "s3", "s4", "s5"]}


def sharded(home, shards, rule):
    return ShardedD1(home, shards, {"devices": rule_from_json("devices", rule)})


@pytest.fixture
def pg(pg_url) -> Iterator[PgmqClient]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(TABLES)
    with PgmqClient(pg_url) as client:
        yield client


@pytest.fixture
def files(tmp_path):
    opened: dict[str, LocalD1Client] = {}

    def open_(name):
        if name not in opened:
            opened[name] = LocalD1Client(tmp_path / f"{name}.sqlite")
        return opened[name]

    yield open_
    for c in opened.values():
        c.close()


def assert_exact(pg, d1: ShardedD1):
    """Every shard holds exactly the rows its rule routes there; unsharded tables match in home."""
    for table in SCHEMA.tables:
        source = pg_rows(pg, table)
        rule = d1.rules.get(table.name)
        if rule is None:
            assert diff(source, d1_rows(d1.home, table)).total == 0
            continue
        for shard, client in d1.databases_of(table.name):
            want = {k: r for k, r in source.items() if rule.route(r["tenant"]) == shard}
            drift = diff(want, d1_rows(client, table))
            assert drift.total == 0, f"shard {shard}: {drift}"
        assert sum(d1_row_counts(d1, table).values()) == len(source)


def drain(pg, d1):
    report = apply(pg, d1, SCHEMA, ApplyOptions(batch_size=500))
    assert report.dead_lettered == 0
    return report


def write(url, stop, rounds, seed, errors, first_id=0):
    """Inserts, updates that move rows between tenants (and so between shards), deletes, key changes."""
    rng = random.Random(seed)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(rounds):
                if stop.is_set():
                    return
                base = first_id + i * 20
                conn.execute(
                    "INSERT INTO devices SELECT g, %s, 'd' || g, 0 FROM generate_series(%s::bigint, %s::bigint) g",
                    [rng.choice(TENANTS), base, base + 19],
                )
                conn.execute(
                    "UPDATE devices SET tenant = %s, n = n + 1 WHERE id %% 5 = %s", [rng.choice(TENANTS), i % 5]
                )
                conn.execute("UPDATE devices SET name = name || '.' WHERE id %% 3 = %s", [i % 3])
                conn.execute("DELETE FROM devices WHERE id %% 37 = %s", [i % 37])
                conn.execute("INSERT INTO notes VALUES (%s, 'x') ON CONFLICT (id) DO UPDATE SET body = 'y'", [i % 17])
                if i % 9 == 4:  # a key change that also moves tenant
                    conn.execute(
                        "UPDATE devices SET id = id + 1000000, tenant = %s WHERE id = (SELECT min(id) FROM devices "
                        "WHERE id < 1000000)",
                        [rng.choice(TENANTS)],
                    )
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def run_writers(url, pg, d1, *, rounds=40, first_id=0, during=None):
    stop, errors = threading.Event(), []
    w = threading.Thread(target=write, args=(url, stop, rounds, 7, errors, first_id))
    w.start()
    try:
        while w.is_alive():
            drain(pg, d1)
            if during is not None:
                during()
                during = None
    finally:
        stop.set()
        w.join()
    assert not errors
    drain(pg, d1)


def test_a_tenant_map_over_three_shards_converges_under_writers_moves_and_truncate(pg, pg_url, files, d1_http):
    d1 = sharded(files("home"), {"eu": files("eu"), "us": d1_http, "ap": files("ap")}, MAP)
    setup(pg, d1, SCHEMA)
    run_writers(pg_url, pg, d1)
    assert_exact(pg, d1)
    pg.execute("INSERT INTO devices SELECT 500000 + g, 't' || g, 'each', 0 FROM generate_series(0, 39) g")
    drain(pg, d1)
    counts = d1_row_counts(d1, SCHEMA.table("devices"))
    assert set(counts) == {"eu", "us", "ap"} and all(counts.values())  # every shard holds rows
    moved = pg.execute("SELECT count(*) FROM devices WHERE n > 0")[0][0]
    assert moved > 0
    # TRUNCATE reaches every shard; rows written after it land where they belong.
    pg.execute("TRUNCATE devices")
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 4), 'after', 0 FROM generate_series(1, 40) g")
    drain(pg, d1)
    assert_exact(pg, d1)
    assert sum(d1_row_counts(d1, SCHEMA.table("devices")).values()) == 40
    st = status(pg, d1, SCHEMA)
    assert set(st.shards) == {"eu", "us", "ap"} and st.last_applied_msg_id is not None


def test_hash_over_four_shards_backfills_while_writers_move_rows(pg, pg_url, files):
    shards = {s: files(s) for s in HASH4["hash"]}
    d1 = sharded(files("home"), shards, HASH4)
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 40), 'old', 0 FROM generate_series(1, 3000) g")
    setup(pg, d1, SCHEMA)
    assert sum(d1_row_counts(d1, SCHEMA.table("devices")).values()) == 0  # setup copies nothing by itself
    stop, errors = threading.Event(), []
    w = threading.Thread(target=write, args=(pg_url, stop, 30, 3, errors, 100_000))
    w.start()
    report = backfill(pg, d1, SCHEMA, tables=["devices"], chunk_size=400)
    stop.set()
    w.join()
    assert not errors and report.tables["devices"].rows > 2500  # the writers delete some meanwhile
    drain(pg, d1)
    assert_exact(pg, d1)
    # Hashing spreads the forty tenants over all four shards. The writers' updates gather rows into a few
    # tenants (how many depends on how many rounds ran), so the spread is asserted on the rule, and the rows on
    # where the rule sends each one's tenant (assert_exact above).
    rule = d1.rules["devices"]
    assert {rule.route(t) for t in TENANTS} == set(HASH4["hash"])
    counts = d1_row_counts(d1, SCHEMA.table("devices"))
    source = pg_rows(pg, SCHEMA.table("devices"))
    assert {s for s, n in counts.items() if n} == {rule.route(r["tenant"]) for r in source.values()}


def test_a_backfill_of_one_shard_writes_only_that_shard(pg, files):
    d1 = sharded(files("home"), {s: files(s) for s in HASH4["hash"]}, HASH4)
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 40), 'x', 0 FROM generate_series(1, 600) g")
    setup(pg, d1, SCHEMA)
    backfill(pg, d1, SCHEMA, shard="s2")
    counts = d1_row_counts(d1, SCHEMA.table("devices"))
    source = pg_rows(pg, SCHEMA.table("devices"))
    assert counts["s2"] == sum(1 for r in source.values() if d1.rules["devices"].route(r["tenant"]) == "s2") > 0
    assert counts["s0"] == counts["s1"] == counts["s3"] == 0
    with pytest.raises(ConfigError, match="sharded to 'nowhere'"):
        backfill(pg, d1, SCHEMA, shard="nowhere")


def test_reconcile_repairs_drift_planted_in_one_shard_and_leaves_the_others_alone(pg, files):
    shards = {s: files(s) for s in HASH4["hash"]}
    d1 = sharded(files("home"), shards, HASH4)
    setup(pg, d1, SCHEMA)
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 40), 'x', 0 FROM generate_series(1, 800) g")
    drain(pg, d1)
    rule = d1.rules["devices"]
    source = pg_rows(pg, SCHEMA.table("devices"))
    in_s1 = sorted(k for k, r in source.items() if rule.route(r["tenant"]) == "s1")
    elsewhere = next(k for k, r in source.items() if rule.route(r["tenant"]) == "s3")
    # Drift in s1 only: a row gone, a row changed, a row Postgres never had, and a stray copy of s3's row.
    shards["s1"].query(f"DELETE FROM devices WHERE id = {in_s1[0][0]}")
    shards["s1"].query(f"UPDATE devices SET name = 'wrong' WHERE id = {in_s1[1][0]}")
    shards["s1"].query("INSERT INTO devices VALUES (999999, 't1', 'ghost', 0)")
    shards["s1"].query(f"INSERT INTO devices VALUES ({elsewhere[0]}, 't0', 'stray', 0)")
    others = {s: d1_rows(c, SCHEMA.table("devices")) for s, c in shards.items() if s != "s1"}

    found = reconcile(pg, d1, SCHEMA, tables=["devices"])
    t = found.tables["devices"]
    assert {s: p.total for s, p in t.shards.items()} == {"s0": 0, "s1": 4, "s2": 0, "s3": 0}
    part = t.shards["s1"]
    assert part.missing == [in_s1[0]] and part.different == [in_s1[1]]
    assert sorted(part.extra) == sorted([(999999,), elsewhere])
    assert not found.in_sync and found.to_json()["tables"]["devices"]["shards"]["s1"]["extra"] == 2

    fixed = reconcile(pg, d1, SCHEMA, tables=["devices"], shard="s1", repair_drift=True)
    assert fixed.tables["devices"].repaired and set(fixed.tables["devices"].shards) == {"s1"}
    assert_exact(pg, d1)
    assert {s: d1_rows(c, SCHEMA.table("devices")) for s, c in shards.items() if s != "s1"} == others
    assert reconcile(pg, d1, SCHEMA).in_sync


def test_growing_from_four_to_six_shards_under_writes_moves_rows_and_converges(pg, pg_url, files):
    shards = {s: files(s) for s in HASH6["hash"]}
    four = sharded(files("home"), {s: shards[s] for s in HASH4["hash"]}, HASH4)
    setup(pg, four, SCHEMA)
    pg.execute("INSERT INTO devices SELECT g, 'u' || (g % 300), 'x', 0 FROM generate_series(1, 3000) g")
    drain(pg, four)
    assert_exact(pg, four)

    # The new rule takes effect: writes route by six shards at once; reconcile moves what is left behind.
    six = sharded(files("home"), shards, HASH6)
    setup(pg, six, SCHEMA)  # the two new databases get the table
    moved = reconcile(pg, six, SCHEMA, tables=["devices"], repair_drift=False)
    misplaced = sum(len(moved.tables["devices"].shards[s].extra) for s in HASH4["hash"])
    assert 600 < misplaced < 1400  # about a third of the rows (jump hash moves only what the new shards take)
    assert all(not moved.tables["devices"].shards[s].missing for s in HASH4["hash"])  # none between old shards
    source = pg_rows(pg, SCHEMA.table("devices"))
    for s in HASH4["hash"]:  # every row to move goes to one of the new shards
        assert {six.rules["devices"].route(source[k]["tenant"]) for k in moved.tables["devices"].shards[s].extra} <= {
            "s4",
            "s5",
        }

    run_writers(
        pg_url,
        pg,
        six,
        rounds=30,
        first_id=10_000,
        during=lambda: reconcile(pg, six, SCHEMA, tables=["devices"], repair_drift=True),
    )
    reconcile(pg, six, SCHEMA, tables=["devices"], repair_drift=True)  # what the writers left in old places
    assert_exact(pg, six)
    assert reconcile(pg, six, SCHEMA).in_sync


def test_a_delete_without_the_shard_column_reaches_every_shard(pg, files):
    d1 = sharded(files("home"), {s: files(s) for s in HASH4["hash"]}, HASH4)
    setup(pg, d1, SCHEMA)
    pg.execute("INSERT INTO devices SELECT g, 't' || g, 'x', 0 FROM generate_series(1, 40) g")
    drain(pg, d1)
    pg.execute("ALTER TABLE devices DISABLE TRIGGER USER")
    pg.execute("DELETE FROM devices WHERE id <= 20")
    pg.execute("ALTER TABLE devices ENABLE TRIGGER USER")
    pg.enqueue([messages.delete_message("devices", {"id": i}) for i in range(1, 21)])  # seed shape: key only
    report = drain(pg, d1)
    assert report.tables["devices"].deletes == 20 * 4  # a key-only delete goes to each of the four shards
    assert_exact(pg, d1)


def test_a_nuke_empties_the_table_in_every_shard_with_a_restore_point_each(pg, files):
    d1 = sharded(files("home"), {s: files(s) for s in HASH4["hash"]}, HASH4)
    setup(pg, d1, SCHEMA)
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 40), 'x', 0 FROM generate_series(1, 200) g")
    pg.execute("INSERT INTO notes VALUES (1, 'kept')")
    drain(pg, d1)
    done = nuke(pg, d1, SCHEMA, tables=["devices"], confirm=True)
    assert set(done.shard_bookmarks) == set(HASH4["hash"]) and all(done.shard_bookmarks.values())
    assert sum(d1_row_counts(d1, SCHEMA.table("devices")).values()) == 0
    assert d1_row_counts(d1, SCHEMA.table("notes")) == {None: 1}
    backfill(pg, d1, SCHEMA, tables=["devices"])
    assert_exact(pg, d1)


def test_remapping_a_tenant_moves_its_rows_through_the_queue_while_writers_write(pg, pg_url, files, d1_http):
    shards = {"eu": files("eu"), "us": d1_http, "ap": files("ap")}
    before = sharded(files("home"), shards, MAP)
    setup(pg, before, SCHEMA)
    pg.execute("INSERT INTO devices SELECT g, 't' || (g % 4), 'x', 0 FROM generate_series(1, 400) g")
    drain(pg, before)
    assert_exact(pg, before)
    # Tenant t1 gets a database of its own: its rows leave "us" for "ap"; t3 stays in "us".
    after = sharded(files("home"), shards, MAP | {"map": MAP["map"] | {"t1": "ap"}})
    found = reconcile(pg, after, SCHEMA, tables=["devices"])
    assert len(found.tables["devices"].shards["us"].extra) == 100
    assert len(found.tables["devices"].shards["ap"].missing) == 100
    run_writers(
        pg_url, pg, after, rounds=20, first_id=5000,
        during=lambda: reconcile(pg, after, SCHEMA, tables=["devices"], repair_drift=True),
    )  # fmt: skip
    reconcile(pg, after, SCHEMA, tables=["devices"], repair_drift=True)
    assert_exact(pg, after)


def test_each_shard_database_records_its_own_position_and_answers_for_what_it_holds(pg, pg_url, files):
    from d1sync_dagster.core.txns import applied
    from d1sync_dagster.engine.position import applied as applied_in
    from d1sync_dagster.engine.position import freshness

    d1 = sharded(files("home"), {s: files(s) for s in ("eu", "us", "ap")}, MAP)
    setup(pg, d1, SCHEMA)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with conn.transaction():  # one transaction over two shards: published per database
            conn.execute("INSERT INTO devices VALUES (1, 't1', 'a', 0), (2, 't2', 'b', 0)")
            xid = int(conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0])
    drain(pg, d1)
    for name in ("home", "eu", "us", "ap"):
        position = freshness(files(name)).position
        assert position is not None and applied(position, xid), name  # every database: the drain's end
    assert applied_in(d1.shards["us"], xid) and applied_in(d1.shards["ap"], xid)
    assert_exact(pg, d1)
