"""The generated capture migration, applied to a real Postgres with PGMQ and exercised."""

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.setup import setup_postgres
from d1sync_dagster.schema import load_schema, parse_schema
from d1sync_dagster.sql.capture import (
    DEFAULT_QUEUE,
    FUNCTION_SCHEMA,
    capture_function,
    function_name,
    migration,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "schema.json")
UUID = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"


@pytest.fixture
def pg(source_db):
    with PgmqClient(source_db) as client:
        setup_postgres(client, SCHEMA)
        yield client


def messages(pg, queue="replicate_data"):
    rows = pg.execute(f"SELECT msg_id, message FROM pgmq.q_{queue} ORDER BY msg_id")
    return [m for _, m in rows]


def test_checked_in_migration_is_the_generated_one():
    out = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "generate-sql", "--schema", str(ROOT / "schema.json")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert out == (ROOT / "supabase_migration.sql").read_text()
    assert out == migration(SCHEMA)


def test_migration_file_runs_as_is_twice(source_db):
    text = (ROOT / "supabase_migration.sql").read_text()
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(text.encode())
        conn.execute(text.encode())
        queues = [r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta ORDER BY 1")]
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'd1sync_capture_%'").fetchone()[0]
    assert queues == ["replicate_data", "replicate_data_dlq", "replicate_data_held"]
    assert triggers == 8


def test_insert_sends_seed_shaped_messages_with_replicated_columns_only(pg):
    pg.execute(
        "INSERT INTO apps (id, owner_id, name, settings, icon, secret_note) "
        "VALUES (1, %s, 'x', '{\"b\": 1}', '\\xdeadbeef', 'hidden')",
        [UUID],
    )
    (m,) = messages(pg)
    assert set(m) == {"record", "old_record", "type", "table", "xid"}  # the seed's shape, plus the transaction
    assert m["type"] == "INSERT" and m["table"] == "apps" and m["old_record"] is None
    assert set(m["record"]) == set(SCHEMA.table("apps").columns)
    assert "secret_note" not in m["record"]
    assert m["record"]["icon"] == "\\xdeadbeef"
    assert m["record"]["settings"] == {"b": 1}


def test_update_sends_old_and_new(pg):
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    pg.execute("UPDATE apps SET name = 'y' WHERE id = 1")
    m = messages(pg)[-1]
    assert m["type"] == "UPDATE"
    assert (m["old_record"]["name"], m["record"]["name"]) == ("x", "y")


def test_update_of_unreplicated_column_or_same_value_sends_nothing(pg):
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    pg.execute("UPDATE apps SET secret_note = 'changed'")
    pg.execute("UPDATE apps SET name = 'x'")
    assert len(messages(pg)) == 1


def test_delete_sends_old_record(pg):
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    pg.execute("DELETE FROM apps")
    m = messages(pg)[-1]
    assert m["type"] == "DELETE" and m["record"] is None and m["old_record"]["id"] == 1


def test_truncate_sends_one_barrier(pg):
    pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x'), (2, 'y')")
    pg.execute("TRUNCATE apps")
    m = messages(pg)[-1]
    assert m.pop("xid") > 0
    assert m == {"record": None, "old_record": None, "type": "TRUNCATE", "table": "apps"}


def test_primary_key_change_deletes_old_key_then_upserts_new(pg):
    # Inserted 2 before 1 so the heap-order update moves 2->3 before 1->2 (the key is not deferrable).
    pg.execute("INSERT INTO apps (id, name) VALUES (2, 'b'), (1, 'a')")
    pg.execute("UPDATE apps SET id = id + 1")  # key 1 disappears, 2 and 3 carry new state
    batch = messages(pg)[2:]
    assert (batch[0]["type"], batch[0]["old_record"]["id"]) == ("DELETE", 1)
    assert {m["type"] for m in batch[1:]} == {"UPDATE"}
    assert {m["record"]["id"]: m["record"]["name"] for m in batch[1:]} == {2: "a", 3: "b"}


def test_composite_key_change(pg):
    pg.execute("INSERT INTO app_versions (app_id, version) VALUES (1, '1.0')")
    pg.execute("UPDATE app_versions SET version = '2.0'")
    batch = messages(pg)[1:]
    assert [m["type"] for m in batch] == ["DELETE", "UPDATE"]
    assert batch[0]["old_record"]["version"] == "1.0" and batch[1]["record"]["version"] == "2.0"


def test_bigint_beyond_2_53_is_exact_in_the_message(pg):
    pg.execute("INSERT INTO apps (id, name) VALUES (9007199254740993, 'big')")
    raw = pg.execute("SELECT message->'record'->>'id' FROM pgmq.q_replicate_data")[0][0]
    assert raw == "9007199254740993"
    assert messages(pg)[0]["record"]["id"] == 9007199254740993


def test_rollback_sends_nothing(pg):
    with pg.conn.transaction(force_rollback=True):
        pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x')")
    assert messages(pg) == []


@pytest.mark.parametrize("via", ["insert", "send_batch"])
def test_bulk_insert_of_10k_rows_is_one_queue_write(source_db, via):
    with PgmqClient(source_db) as pg:
        pg.execute(migration(SCHEMA, via=via))
        pg.execute("INSERT INTO apps (id, name) SELECT g, 'n' || g FROM generate_series(1, 10000) g")
        n, distinct_vt, ids, span = pg.execute(
            "SELECT count(*), count(DISTINCT vt), count(DISTINCT message->'record'->>'id'), "
            "max(msg_id) - min(msg_id) + 1 FROM pgmq.q_replicate_data"
        )[0]
        assert n == 10000 and ids == 10000 and span == 10000
        # One queue write per statement gives every message the same visibility time; per-row sends would not.
        assert distinct_vt == 1
        pg.execute("UPDATE apps SET name = name || '!' WHERE id <= 5000")
        assert pg.execute("SELECT count(*) FROM pgmq.q_replicate_data WHERE message->>'type' = 'UPDATE'")[0][0] == 5000


def test_wide_table_over_50_columns_and_hostile_names(pg):
    cols = {f"c{i}": "INTEGER" for i in range(70)} | {"order": "TEXT", "my col": "TEXT", "naïve": "TEXT"}
    schema = parse_schema({"select": {"primaryKey": "order", "columns": cols}})
    ddl = ", ".join(f'"{c}" {"text" if t == "TEXT" else "int"}' for c, t in cols.items())
    pg.execute(f'CREATE TABLE "select" ({ddl}, PRIMARY KEY ("order"))')
    setup_postgres(pg, schema)
    pg.execute('INSERT INTO "select" ("order", "my col", "naïve", c69) VALUES (\'k\', \'v\', \'ü\', 69)')
    m = messages(pg)[-1]
    assert m["table"] == "select" and len(m["record"]) == 73
    assert (m["record"]["my col"], m["record"]["naïve"], m["record"]["c69"]) == ("v", "ü", 69)


def test_every_message_carries_its_source_transaction(pg):
    with pg.transaction():
        pg.execute("INSERT INTO apps (id, name) VALUES (1, 'x'), (2, 'y')")
        pg.execute("UPDATE apps SET name = 'z' WHERE id = 1")
        (xid,) = pg.execute("SELECT pg_current_xact_id()::text::bigint")[0]
    pg.execute("DELETE FROM apps WHERE id = 2")
    got = [m["xid"] for m in messages(pg)]
    assert got[:3] == [xid, xid, xid] and got[3] != xid


def _body(pg, table) -> str:
    return pg.execute(
        "SELECT prosrc FROM pg_proc WHERE proname = %s AND pronamespace = %s::regnamespace",
        [function_name(table), FUNCTION_SCHEMA],
    )[0][0]


def test_the_record_is_the_row_itself_where_every_column_is_replicated(pg):
    """The name-free form's subtraction of the columns that are not replicated costs a pass over each row: it
    is left out where there are none (the row goes as it is), and where one is left out it leaves the finished
    message (one pass, not two). While the columns are in place, the function takes them by name."""
    pg.execute("CREATE TABLE plain (id int PRIMARY KEY, name text)")
    schema = parse_schema({"plain": {"primaryKey": "id", "columns": {"id": "INTEGER", "name": "TEXT"}}})
    setup_postgres(pg, schema)
    plain = _body(pg, schema.table("plain"))
    assert "OPERATOR(pg_catalog.-)" not in plain and "#-" not in plain and "@d1sync" not in plain
    assert "COALESCE(r.*) AS record" in plain
    assert '"d1sync".columns_in_place(' in plain  # by name while the columns are in place
    apps = _body(pg, SCHEMA.table("apps"))  # apps has one column schema.json leaves out
    assert '"d1sync".columns_in_place(' in apps and "IF false THEN" not in apps
    assert "OPERATOR(pg_catalog.#-) '{record,secret_note}'::text[]" in apps
    assert "OPERATOR(pg_catalog.#-) '{old_record,secret_note}'::text[]" in apps
    pg.execute("INSERT INTO plain VALUES (1, 'a')")
    pg.execute("UPDATE plain SET name = 'b'")
    pg.execute("ALTER TABLE plain ADD COLUMN later int")
    pg.execute("UPDATE plain SET later = 7")  # by name: the added column does not travel (apply ignores it)
    pg.execute("ALTER TABLE plain RENAME COLUMN name TO title")
    pg.execute("UPDATE plain SET later = 8")  # name-free: the whole row, the added column too
    got = [(m["type"], m["record"]) for m in messages(pg) if m["table"] == "plain"]
    assert got == [
        ("INSERT", {"id": 1, "name": "a"}),
        ("UPDATE", {"id": 1, "name": "b"}),
        ("UPDATE", {"id": 1, "title": "b", "later": 8}),
    ]


#: Source columns named like the capture function's own names: its variables (`xid`, `msgs`, `notified`), its aliases
#: (`r`, `t`, `c`, `s`, `x`, `j`, `m`, `o`, `n`, `k0`, `ord`) and the message's keys.
CLASHING = [
    "r",
    "t",
    "c",
    "s",
    "x",
    "j",
    "m",
    "o",
    "n",
    "k0",
    "ord",
    "xid",
    "msgs",
    "notified",
    "record",
    "type",
    "table",
]


@pytest.mark.parametrize("kept_out", [[], ["secret"], ["secret", 'we"ird,{x}']], ids=["none", "one", "two"])
def test_columns_named_like_the_functions_own_names_travel_as_columns(pg, kept_out):
    """A table with a column `xid` made every write fail (an ambiguous name in the function), and one with a
    column `r` or `t` sent that column's value as the record. Every shape of the function (no column left
    out, one, two with a hostile name) gets the whole row, less the columns left out."""

    def quoted(c: str) -> str:
        return '"' + c.replace('"', '""') + '"'

    cols = ["id", *CLASHING]
    ddl = ", ".join(f"{quoted(c)} {'int PRIMARY KEY' if c == 'id' else 'text'}" for c in [*cols, *kept_out])
    pg.execute(f"CREATE TABLE clash ({ddl})")
    types = {c: "INTEGER" if c == "id" else "TEXT" for c in cols}
    setup_postgres(pg, parse_schema({"clash": {"primaryKey": "id", "columns": types}}))
    written = [*cols, *kept_out]
    values = [1] + [f"{c}!" for c in CLASHING] + ["not replicated"] * len(kept_out)
    placeholders = ", ".join(["%s"] * len(written))
    pg.execute(f"INSERT INTO clash ({', '.join(map(quoted, written))}) VALUES ({placeholders})", values)
    pg.execute("UPDATE clash SET r = 'r2', xid = 'x2'")
    pg.execute("UPDATE clash SET id = 2")
    pg.execute("DELETE FROM clash")
    got = [m for m in messages(pg) if m["table"] == "clash"]
    row = {"id": 1} | {c: f"{c}!" for c in CLASHING}
    changed = row | {"r": "r2", "xid": "x2"}
    assert [(m["type"], m["record"], m["old_record"]) for m in got] == [
        ("INSERT", row, None),
        ("UPDATE", changed, row),
        ("DELETE", None, changed),
        ("UPDATE", changed | {"id": 2}, None),
        ("DELETE", None, changed | {"id": 2}),
    ]
    assert all(isinstance(m["xid"], int) for m in got)


def _name_free(sql: str) -> str:
    """A capture install that always takes the name-free form (where the install would name the columns)."""
    return sql.replace("  EXECUTE pg_catalog.replace(", "  named := 'false';\n  EXECUTE pg_catalog.replace(", 1)


def _workload(pg, table: str, kept_out: list[str]) -> list[list[dict]]:
    """Every kind of change, with values of many types, on `table` (key id, see the test below): the messages
    of each statement, without their transaction ids."""
    q = '"' + table + '"'
    hidden = [f'"{c.replace(chr(34), chr(34) * 2)}"' for c in kept_out]
    statements = [
        f"INSERT INTO {q} (id, name, doc, big, blob, at, r, xid{''.join(', ' + c for c in hidden)}) VALUES "
        "(1, 'a', '{\"k\": [1, {\"z\": null}]}', 9007199254740993, '\\x00ff', '2024-02-29 12:00:00+00', 'r!', "
        f"'x!'{''.join(chr(44) + chr(39) + 'secret' + chr(39) for _ in hidden)}), "
        f"(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL{', NULL' * len(hidden)})",
        f"UPDATE {q} SET name = 'b', doc = '[]' WHERE id = 1",
        f"UPDATE {q} SET name = name",  # changes nothing: sends nothing
        # Only columns kept out of D1 change: sends nothing.
        f"UPDATE {q} SET {', '.join(f'{c} = {c} || {chr(39)}?{chr(39)}' for c in hidden) or 'doc = doc'}",
        f"UPDATE {q} SET id = 3 - id",  # the keys swap: both stay, so two UPDATEs and no DELETE
        f"UPDATE {q} SET id = id + 10, xid = 'x2'",  # every key changes: two DELETEs, then two UPDATEs
        f"DELETE FROM {q} WHERE id = 11",
        f"TRUNCATE {q}",
    ]
    out = []
    for sql in statements:
        seen = len(messages(pg))
        pg.execute(sql)
        out.append([{k: v for k, v in m.items() if k != "xid"} for m in messages(pg)[seen:]])
    return out


@pytest.mark.parametrize(
    "kept_out", [[], ["secret"], ["secret", 'we"ird,{x}']], ids=["every column replicated", "one out", "two out"]
)
def test_both_forms_of_capture_send_the_same_messages(source_db, kept_out):
    """While every replicated column is in place, capture takes them by name (one pass over each row, and an
    UPDATE compares rows before building any JSON); after a DDL moved one, it takes the whole row less the
    others (name-free). Both forms send the same messages for the same changes."""
    cols = {"id": "INTEGER", "name": "TEXT", "doc": "JSON", "big": "INTEGER", "blob": "BLOB", "at": "TEXT"}
    cols |= {"r": "TEXT", "xid": "TEXT", "my col,{z}": "TEXT"}  # named like the function's own names; hostile
    schema = parse_schema({"mixed": {"primaryKey": "id", "columns": cols}})
    hidden = "".join(f', "{c.replace(chr(34), chr(34) * 2)}" text' for c in kept_out)
    ddl = (
        "CREATE TABLE mixed (id int PRIMARY KEY DEFERRABLE, name text, doc jsonb, big bigint, blob bytea, "
        f'at timestamptz, r text, xid text, "my col,{{z}}" text{hidden})'
    )
    got = {}
    for form in ("named", "name-free"):
        with PgmqClient(source_db) as pg:
            pg.execute("DROP TABLE IF EXISTS mixed")
            pg.execute(ddl)
            setup_postgres(pg, schema)
            if form == "name-free":
                pg.execute(_name_free(capture_function(schema.table("mixed"), DEFAULT_QUEUE)))
            body = _body(pg, schema.table("mixed"))
            assert ("columns_in_place(" in body) == (form == "named")
            pg.execute("SELECT pgmq.purge_queue('replicate_data')")
            got[form] = _workload(pg, "mixed", kept_out)

    def same(statements: list[list[dict]]) -> list[list[str]]:  # rows of one statement come in no set order
        return [sorted(json.dumps(m, sort_keys=True) for m in ms) for ms in statements]

    assert same(got["named"]) == same(got["name-free"])
    for run in got.values():
        types = [[m["type"] for m in ms] for ms in run]
        assert types == [
            ["INSERT", "INSERT"],
            ["UPDATE"],
            [],
            [],
            ["UPDATE", "UPDATE"],
            ["DELETE", "DELETE", "UPDATE", "UPDATE"],
            ["DELETE"],
            ["TRUNCATE"],
        ]
    first = got["named"][0][0]["record"] if got["named"][0][0]["record"]["id"] == 1 else got["named"][0][1]["record"]
    assert set(first) == set(cols) and first["big"] == 9007199254740993 and first["doc"] == {"k": [1, {"z": None}]}
    assert (first["r"], first["xid"], first["blob"]) == ("r!", "x!", "\\x00ff")


def test_ddl_from_another_session_moves_a_writer_between_the_named_and_the_name_free_form(pg, source_db):
    """A writer's session keeps its plans. A replicated column renamed or dropped, or the table renamed, by
    another session, or earlier in the writer's own transaction, must move it to the name-free form before its
    next write (its plan of the named form would fail), and back once the columns are in place again.
    A column added since the install tells the forms apart: only the name-free form sends it."""

    def last() -> dict:
        return messages(pg)[-1]["record"]

    pg.execute("ALTER TABLE apps ADD COLUMN extra int")
    pg.execute("INSERT INTO apps (id, name, rating, extra) VALUES (1, 'a', 1.5, 7)")
    assert "extra" not in last() and last()["rating"] == 1.5  # by name
    with psycopg.connect(source_db, autocommit=True) as other:
        other.execute("ALTER TABLE apps RENAME COLUMN rating TO score")
        pg.execute("INSERT INTO apps (id, name, score, extra) VALUES (2, 'b', 2.5, 7)")
        assert last()["score"] == 2.5 and "rating" not in last() and last()["extra"] == 7  # name-free
        other.execute("ALTER TABLE apps RENAME COLUMN score TO rating")
        pg.execute("INSERT INTO apps (id, name, rating, extra) VALUES (3, 'c', 3.5, 7)")
        assert "extra" not in last() and last()["rating"] == 3.5  # by name again
        other.execute("ALTER TABLE apps RENAME TO apps_moved")
        pg.execute("INSERT INTO apps_moved (id, name, extra) VALUES (4, 'd', 7)")
        assert last()["extra"] == 7 and "secret_note" not in last()
        other.execute("ALTER TABLE apps_moved RENAME TO apps")
        pg.execute("UPDATE apps SET name = 'e' WHERE id = 4")
        assert "extra" not in last() and last()["name"] == "e"
        other.execute("ALTER TABLE apps DROP COLUMN rating")
        pg.execute("DELETE FROM apps WHERE id = 4")
        gone = messages(pg)[-1]["old_record"]
        assert gone["id"] == 4 and "rating" not in gone and gone["extra"] == 7
    with pg.transaction():
        pg.execute("ALTER TABLE apps ADD COLUMN rating double precision")
        pg.execute("INSERT INTO apps (id, name, rating, extra) VALUES (5, 'f', 5.5, 7)")
        assert "extra" not in last() and last()["rating"] == 5.5
        pg.execute("ALTER TABLE apps DROP COLUMN name")
        pg.execute("INSERT INTO apps (id, rating, extra) VALUES (6, 6.5, 7)")
        assert "name" not in last() and last()["extra"] == 7


def test_columns_in_place_checks_the_table_and_its_columns(pg):
    (oid,) = pg.execute("SELECT 'public.apps'::regclass::oid")[0]

    def check(rel: str, relid: int, columns: list[str]) -> bool:
        return pg.execute("SELECT d1sync.columns_in_place(%s, %s, %s)", [rel, relid, columns])[0][0]

    assert check('"public"."apps"', oid, ["id", "name", "rating"]) is True
    assert check('"public"."apps"', oid, []) is True
    assert check('"public"."apps"', oid, ["id", "nope"]) is False
    assert check('"public"."apps"', oid + 1, ["id"]) is False  # an oid from before a dump and restore
    assert check('"public"."gone"', oid, ["id"]) is False
    pg.execute("ALTER TABLE apps DROP COLUMN rating")
    assert check('"public"."apps"', oid, ["id", "rating"]) is False


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_writer_whose_snapshot_predates_the_ddl_still_writes(pg, source_db, isolation):
    """A REPEATABLE READ transaction reads the catalog as of its first statement, while planning sees the
    table as it is: the check for the named form must see what the planner sees, or the dropped column's
    name reaches the planner and the write fails."""
    pg.execute("INSERT INTO apps (id, name, rating) VALUES (1, 'a', 1.5)")  # this session plans the named form
    with pg.transaction():
        pg.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        pg.execute("SELECT 1")  # the transaction's snapshot, taken before the DDL (no lock on apps)
        with psycopg.connect(source_db, autocommit=True) as other:
            other.execute("ALTER TABLE apps DROP COLUMN rating")
        pg.execute("INSERT INTO apps (id, name) VALUES (2, 'b')")
    m = messages(pg)[-1]["record"]
    assert m["id"] == 2 and "rating" not in m and "secret_note" not in m
