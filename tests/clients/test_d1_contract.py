"""One contract, two backends: the local SQLite file and the HTTP API stand-in on the real D1 engine."""

import pytest

from d1sync_dagster.core.statements import Statement
from d1sync_dagster.errors import D1Error, D1LimitError
from d1sync_dagster.schema import load_schema
from d1sync_dagster.sql.d1_ddl import META_TABLE, schema_ddl
from tests.conftest import ROOT

BIG = 2**53 + 1


def make_table(d1):
    d1.batch([Statement("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n INTEGER, r REAL)")])


def test_batch_gives_one_result_per_statement_in_order(d1):
    make_table(d1)
    res = d1.batch(
        [
            Statement("INSERT INTO t (id, v) VALUES (?, ?)", (1, "a")),
            Statement("INSERT INTO t (id, v) VALUES (?, ?)", (2, "b")),
            Statement("SELECT id, v FROM t ORDER BY id"),
        ]
    )
    assert len(res) == 3
    assert res[0].meta["changes"] == 1 and res[0].rows_written >= 1
    assert res[2].results == [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]


def test_sql_string_with_several_statements_gives_one_result_each(d1):
    res = d1.query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'x;y'); SELECT v FROM t;")
    assert len(res) == 3
    assert res[2].results == [{"v": "x;y"}]


def test_integer_beyond_2_53_arrives_exactly(d1):
    make_table(d1)
    d1.batch([Statement("INSERT INTO t (id, n) VALUES (?, ?)", (1, BIG))])
    (res,) = d1.query("SELECT typeof(n) AS ty, CAST(n AS TEXT) AS s FROM t")
    assert res.results == [{"ty": "integer", "s": str(BIG)}]


def test_bool_param_is_stored_as_integer(d1):
    make_table(d1)
    d1.batch([Statement("INSERT INTO t (id, n, r) VALUES (?, ?, ?)", (1, True, 1.5))])
    (res,) = d1.query("SELECT n, typeof(n) AS ty, r FROM t")
    assert res.results == [{"n": 1, "ty": "integer", "r": 1.5}]


def test_failing_batch_is_all_or_nothing(d1):
    make_table(d1)
    with pytest.raises(D1Error) as e:
        d1.batch(
            [
                Statement("INSERT INTO t (id, v) VALUES (?, ?)", (1, "a")),
                Statement("INSERT INTO nope (id) VALUES (?)", (2,)),
            ]
        )
    assert "no such table: nope" in str(e.value)
    assert not e.value.retryable
    (res,) = d1.query("SELECT count(*) AS n FROM t")
    assert res.results == [{"n": 0}]


def test_single_statement_error_names_statement_zero(d1):
    with pytest.raises(D1Error) as e:
        d1.query("SELECT * FROM missing_table")
    assert e.value.statement_index == 0
    assert "missing_table" in str(e.value)


def test_more_than_100_parameters_is_refused_before_sending(d1):
    make_table(d1)
    placeholders = ",".join(["(?)"] * 101)
    with pytest.raises(D1LimitError, match="101 bound parameters, D1 allows 100") as e:
        d1.batch([Statement("SELECT 1"), Statement(f"INSERT INTO t (id) VALUES {placeholders}", tuple(range(101)))])
    assert e.value.statement_index == 1


def test_statement_over_100kb_is_refused_before_sending(d1):
    with pytest.raises(D1LimitError, match="D1 allows 100000") as e:
        d1.query("SELECT '" + "x" * 100_001 + "'")
    assert e.value.statement_index == 0


def test_exactly_100_parameters_is_accepted(d1):
    make_table(d1)
    placeholders = ",".join(["(?)"] * 100)
    (res,) = d1.batch([Statement(f"INSERT INTO t (id) VALUES {placeholders}", tuple(range(100)))])
    assert res.meta["changes"] == 100


def test_transaction_statements_are_refused(d1):
    with pytest.raises(D1Error, match="(?i)transaction|BEGIN"):
        d1.query("BEGIN")


def test_blob_values_cannot_be_bound(d1):
    with pytest.raises(D1LimitError, match="BLOBs must be inlined"):
        d1.batch([Statement("SELECT ?", (b"\x00",))])  # type: ignore[arg-type]


def test_blob_literal_round_trips(d1):
    d1.batch(
        [
            Statement("CREATE TABLE b (id INTEGER PRIMARY KEY, x BLOB)"),
            Statement("INSERT INTO b VALUES (1, X'DEADBEEF')"),
        ]
    )
    (res,) = d1.query("SELECT hex(x) AS h, typeof(x) AS ty FROM b")
    assert res.results == [{"h": "DEADBEEF", "ty": "blob"}]


def test_schema_ddl_applies_and_is_idempotent(d1):
    schema = load_schema(ROOT / "schema.json")
    stmts = [Statement(s) for s in schema_ddl(schema)]
    d1.batch(stmts)
    d1.batch(stmts)
    (res,) = d1.query(
        "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%' "
        "AND type IN ('table', 'index') ORDER BY type, name"
    )
    got = {(r["type"], r["name"]) for r in res.results}
    assert ("table", META_TABLE) in got and ("table", "apps") in got and ("table", "app_versions") in got
    indexes = sorted(r["tbl_name"] for r in res.results if r["type"] == "index")
    assert indexes == ["app_versions", "apps", "apps"]  # no index duplicates a primary key


def test_composite_key_table_is_without_rowid_and_enforces_key(d1):
    schema = load_schema(ROOT / "schema.json")
    d1.batch([Statement(s) for s in schema_ddl(schema)])
    (res,) = d1.query("SELECT sql FROM sqlite_master WHERE name = 'app_versions'")
    assert "WITHOUT ROWID" in res.results[0]["sql"]
    d1.batch([Statement("INSERT INTO app_versions (app_id, version) VALUES (?, ?)", (1, "1.0"))])
    with pytest.raises(D1Error, match="UNIQUE constraint failed"):
        d1.batch([Statement("INSERT INTO app_versions (app_id, version) VALUES (?, ?)", (1, "1.0"))])


def test_raw_returns_columns_and_array_rows(d1):
    make_table(d1)
    d1.batch([Statement("INSERT INTO t (id, v) VALUES (?, ?), (?, ?)", (1, "a", 2, "b"))])
    cols, rows, _meta = d1.raw("SELECT id, v FROM t ORDER BY id")
    assert cols == ["id", "v"] and rows == [[1, "a"], [2, "b"]]


def test_bookmark_gives_a_restore_point(d1):
    make_table(d1)
    mark = d1.bookmark()
    assert isinstance(mark, str) and len(mark) > 8


def test_at_most_100_columns_in_a_result(d1):
    d1.query("SELECT " + ", ".join(f"{i} AS c{i}" for i in range(100)))
    with pytest.raises(D1Error, match="too many columns in result set") as e:
        d1.query("SELECT " + ", ".join(f"{i} AS c{i}" for i in range(101)))
    assert e.value.kind == "sql"


def test_at_most_100_columns_in_a_table(d1):
    with pytest.raises(D1Error, match="too many columns on wide"):
        d1.query("CREATE TABLE wide (" + ", ".join(f"c{i} INTEGER" for i in range(101)) + ")")


def test_values_up_to_2_000_000_bytes(d1):
    (res,) = d1.query("SELECT length(?) AS n", ["x" * 1_999_990])
    assert res.results == [{"n": 1_999_990}]
    with pytest.raises(D1Error, match="string or blob too big") as e:
        d1.query("SELECT length(?) AS n", ["x" * 2_000_001])
    assert e.value.kind == "sql"


def test_at_most_32_function_arguments(d1):
    (res,) = d1.query("SELECT coalesce(" + ", ".join(["NULL"] * 31 + ["7"]) + ") AS v")
    assert res.results == [{"v": 7}]
    with pytest.raises(D1Error, match="too many arguments on function coalesce") as e:
        d1.query("SELECT coalesce(" + ", ".join(["1"] * 33) + ") AS v")
    assert e.value.kind == "sql"


def test_expressions_at_most_100_deep(d1):
    d1.query("SELECT " + " OR ".join(["0"] * 90) + " AS v")
    with pytest.raises(D1Error, match="Expression tree is too large") as e:
        d1.query("SELECT " + " OR ".join(["0"] * 101) + " AS v")
    assert e.value.kind == "sql"


def test_raw_names_every_column_as_selected_even_for_no_rows(d1):
    columns, rows, _ = d1.raw('SELECT 1 AS a, 2 AS a, 3 AS "1"')
    assert columns == ["a", "a", "1"] and rows == [[1, 2, 3]]
    columns, rows, _ = d1.raw("SELECT 1 AS a, 2 AS b WHERE 0")
    assert columns == ["a", "b"] and rows == []


def test_a_restore_point_brings_the_database_back(d1):
    d1.query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    d1.query("INSERT INTO t VALUES (1, 'a', X'00ff'), (2, 'b', NULL)")
    bookmark = d1.bookmark()
    d1.query("DELETE FROM t WHERE id = 1")
    d1.query("INSERT INTO t VALUES (3, 'c', NULL)")
    undo = d1.restore(bookmark)
    (res,) = d1.query("SELECT id, v, hex(b) AS b FROM t ORDER BY id")
    assert res.results == [{"id": 1, "v": "a", "b": "00FF"}, {"id": 2, "v": "b", "b": ""}]
    d1.restore(undo)  # the restore is undone by the bookmark it returned
    (res,) = d1.query("SELECT id FROM t ORDER BY id")
    assert res.results == [{"id": 2}, {"id": 3}]


def test_an_unknown_restore_point_is_a_clear_error(d1):
    with pytest.raises(D1Error, match="bookmark|restore point"):
        d1.restore("00000000-nope")
