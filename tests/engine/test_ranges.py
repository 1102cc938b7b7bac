"""A range read selects some columns natively (engine.ranges.read_natively) and the rest through to_jsonb;
what D1 receives must be exactly what rendering every value with to_jsonb, as the capture triggers do, gives:
the same literals for every row, the same refusals with the same reasons."""

from datetime import UTC, datetime

from d1sync_dagster.clients.pgmq import PgmqClient, QueueMessage
from d1sync_dagster.core.changes import Change, Poison, decode_all
from d1sync_dagster.core.chunks import decode_chunk
from d1sync_dagster.core.plan import row_literal
from d1sync_dagster.engine.ranges import RangeReader, column_types, read_natively
from d1sync_dagster.schema import parse_schema

COLUMNS = {
    "id": ("bigint", "INTEGER"),
    "s": ("smallint", "INTEGER"),
    "i": ("integer", "TEXT"),
    "t": ("text", "TEXT"),
    "t_int": ("text", "INTEGER"),
    "v": ("varchar(12)", "TEXT"),
    "c": ("char(4)", "TEXT"),
    "b": ("boolean", "BOOLEAN"),
    "b_text": ("boolean", "TEXT"),
    "f": ("double precision", "REAL"),
    "f_text": ("double precision", "TEXT"),
    "f_json": ("double precision", "JSON"),
    "f4": ("real", "REAL"),
    "num": ("numeric", "REAL"),
    "num_text": ("numeric", "TEXT"),
    "j": ("jsonb", "JSON"),
    "j_text": ("jsonb", "TEXT"),
    "js": ("json", "JSON"),
    "ts": ("timestamptz", "INTEGER"),
    "u": ("uuid", "TEXT"),
    "bytes": ("bytea", "BLOB"),
    "arr": ("bigint[]", "JSON"),
}
SCHEMA = parse_schema({"typed": {"primaryKey": "id", "columns": {c: t for c, (_, t) in COLUMNS.items()}}})
ROWS = [
    # id, s, i, t, t_int, v, c, b, b_text, f, f_text, f_json, f4, num, num_text, j, j_text, js, ts, u, bytes, arr
    "1, 1, 2, 'plain', '42', 'v', 'ab', true, false, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, '{\"b\": 1, \"a\": [1.0, 2]}', "
    "'[1, 2]', '{\"a\": 1e2, \"a\": 3}', '2024-02-29 12:34:56+02', 'ABCDEF01-2345-6789-ABCD-EF0123456789', "
    "'\\x00ff'::bytea, '{1,2}'",
    "2, -32768, 2147483647, 'it''s ünïcødé 😀', '2024-02-29', 'x''y', 'abcd', false, true, 'NaN', 'NaN', 'NaN', "
    "'Infinity', 'NaN', 'NaN', '12345678901234567890123', '0.1000000000000000055511151231257827', "
    "'[1.10, 2e-3]', '1970-01-01', 'abcdef01-2345-6789-abcd-ef0123456789', '\\x'::bytea, '{}'",
    "3, 0, 0, '', '7', '', '', null, null, '-0', '-0', '-0', '-0', '-0.0', '-0.0', 'null', '\"str\"', "
    "'\"str\"', 'infinity', null, null, null",
    "9223372036854775807, 32767, -1, '{\"looks\": \"like json\"}', '-9223372036854775808', null, null, true, true, "
    "1.7976931348623157e308, 5e-324, 1e-300, 3.4e38, 12345678901234567890.5, 1e-30, "
    '\'{"n": 9007199254740993, "f": 0.30000000000000004}\', \'{"z": {"y": [true, null]}}\', \'[]\', '
    "'2262-04-11 23:47:16.854775807+00', null, null, '{9223372036854775807}'",
    "-9223372036854775808, null, null, null, 'not a number', null, null, null, null, -1.5e-7, 123456.789, 2.5, "
    "null, null, null, null, null, null, null, null, null, null",
]


def test_native_and_to_jsonb_reads_give_d1_the_same(pg_url):
    with PgmqClient(pg_url) as pg:
        pg.execute(
            "CREATE TABLE typed (" + ", ".join(f"{c} {t}" for c, (t, _) in COLUMNS.items()) + ", PRIMARY KEY (id))"
        )
        for r in ROWS:
            pg.execute(f"INSERT INTO typed VALUES ({r})")
        table = SCHEMA.table("typed")
        types = column_types(pg, table)
        native = {c for c in table.columns if read_natively(types[c], table.columns[c])}
        assert native == {"id", "s", "i", "t", "t_int", "v", "b", "b_text", "f", "j", "j_text"}

        marker = {"type": "BACKFILL", "table": "typed", "range": {"after": None, "upto": None}, "rows": 5}
        (resolved,) = RangeReader(pg, SCHEMA, max_rows=100).resolve([QueueMessage(1, 1, datetime.now(UTC), marker)])
        cols = ", ".join(table.columns)
        ((as_json,),) = pg.execute(
            f"SELECT json_agg(jsonb_build_array({cols}) ORDER BY id) FROM typed"  # the triggers' rendering
        )
    reference = {"type": "BACKFILL", "table": "typed", "columns": list(table.columns), "rows": as_json}
    expected = decode_all(1, reference, SCHEMA)
    got = decode_all(1, resolved.message, SCHEMA)
    fast = decode_chunk(1, resolved.message, SCHEMA)
    assert fast is not None

    expected_literals = [row_literal(table, c.row) for c in expected if isinstance(c, Change)]
    assert [row_literal(table, c.row) for c in got if isinstance(c, Change)] == expected_literals
    assert fast.literals == expected_literals
    expected_poison = [p for p in expected if isinstance(p, Poison)]
    assert [p for p in got if isinstance(p, Poison)] == expected_poison == fast.poison
    # The rows above exercise both outcomes: rows that apply and rows refused with a reason.
    assert len(expected_literals) >= 2 and len(expected_poison) >= 2
