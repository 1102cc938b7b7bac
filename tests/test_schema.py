import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d1sync_dagster.errors import SchemaError
from d1sync_dagster.schema import MAX_COLUMNS, check_identifier, load_schema, parse_schema

ROOT = Path(__file__).resolve().parent.parent


def table(**over):
    base = {"primaryKey": "id", "columns": {"id": "INTEGER", "name": "TEXT"}}
    base.update(over)
    return base


def test_example_schema_loads_with_composite_key_and_every_type():
    schema = load_schema(ROOT / "schema.json")
    assert len(schema.tables) >= 2
    assert any(len(t.key) > 1 for t in schema.tables)
    types = {typ for t in schema.tables for typ in t.columns.values()}
    assert types == {"INTEGER", "TEXT", "BOOLEAN", "JSON", "REAL", "BLOB"}


def test_seed_format_is_accepted():
    schema = parse_schema(
        {
            "stripe_info": {
                "primaryKey": "id",
                "columns": {"id": "INTEGER", "customer_id": "TEXT", "status": "TEXT", "is_good_plan": "BOOLEAN"},
                "indexes": ["customer_id", ["status", "is_good_plan"]],
            }
        }
    )
    t = schema.table("stripe_info")
    assert t.key == ("id",)
    assert t.indexes == (("customer_id",), ("status", "is_good_plan"))
    assert t.target == "stripe_info"


def test_index_on_primary_key_is_skipped_not_duplicated():
    schema = parse_schema({"t": table(indexes=["id", "name"])})
    assert schema.table("t").indexes == (("name",),)


def test_round_trip_through_canonical_json_keeps_version():
    schema = load_schema(ROOT / "schema.json")
    again = parse_schema(json.loads(json.dumps(schema.to_json())))
    assert again.version == schema.version
    assert [t.version for t in again.tables] == [t.version for t in schema.tables]


def test_version_changes_when_a_column_is_added():
    a = parse_schema({"t": table()})
    b = parse_schema({"t": table(columns={"id": "INTEGER", "name": "TEXT", "extra": "REAL"})})
    assert a.version != b.version


def test_owners_and_tags_are_kept_for_dagster_without_changing_the_versions():
    plain = parse_schema({"t": table()})
    dressed = parse_schema({"t": table(owners=["data@example.com", "team:edge"], tags={"tier": "gold"})})
    assert dressed.version == plain.version and dressed.tables[0].version == plain.tables[0].version
    assert dressed.tables[0].spec.owners == ("data@example.com", "team:edge")
    assert dressed.to_json()["t"]["tags"] == {"tier": "gold"}
    assert parse_schema(dressed.to_json()) == dressed


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"t": table(primaryKey="nope")}, "table 't'.*primaryKey: column 'nope' is not among columns"),
        ({"t": table(indexes=["ghost"])}, "table 't'.*indexes: column 'ghost' is not among columns"),
        ({"t": table(extra=1)}, "table 't', field 'extra': unknown key"),
        ({"t": table(columns={"id": "INTEGER", "x": "VARCHAR"})}, "table 't', field 'columns.x'"),
        ({"t": table(columns={"id": "INTEGER", "": "TEXT"})}, "table 't'.*identifier is empty"),
        ({"t": table(columns={"id": "INTEGER", 'a"b': "TEXT"})}, "double quote"),
        ({"t": table(columns={"id": "INTEGER", "a'b": "TEXT"})}, "single quote"),
        ({"t": table(columns={"id": "INTEGER", "a\x00b": "TEXT"})}, "NUL"),
        ({"t": table(columns={"id": "INTEGER", "x" * 64: "TEXT"})}, "longer than 63 bytes"),
        ({"sqlite_master": table()}, "reserved prefix"),
        ({"t": table(columns={f"c{i}": "TEXT" for i in range(MAX_COLUMNS + 1)} | {"id": "INTEGER"})}, "at most 100"),
        ({"t": table(primaryKey=[])}, "primaryKey: at least one column"),
        ({"t": table(primaryKey=["id", "id"])}, "listed twice"),
        ({"t": table(columns={"id": "JSON"})}, "key columns must be one of"),
        ({"t": table(columns={"id": "INTEGER", "ID": "TEXT"})}, "differ only by case"),
        ({"t": table(indexes=[[]])}, "needs at least one column"),
        ({"a": table(target="x"), "b": table(target="x")}, "same D1 table name"),
        ({}, "lists no tables"),
        ({"t": table(columns={})}, "at least one column"),
        ({"t": table(owners=["not an owner"])}, "table 't'.*owners: 'not an owner' is neither an e-mail"),
        ({"t": table(tags={"bad key": "x"})}, "table 't'.*tags: key 'bad key'"),
        ({"t": table(tags={"tier": "a b"})}, "table 't'.*tags: value 'a b' of 'tier'"),
    ],
)
def test_bad_schema_is_refused_naming_table_and_field(data, expected):
    with pytest.raises(SchemaError, match=expected):
        parse_schema(data)


def test_top_level_must_be_object():
    with pytest.raises(SchemaError, match="top level must be an object"):
        parse_schema([1, 2])


def test_invalid_json_file_names_the_line(tmp_path):
    p = tmp_path / "schema.json"
    p.write_text('{"t": {"primaryKey": "id",,}}')
    with pytest.raises(SchemaError, match="not valid JSON at line 1"):
        load_schema(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SchemaError, match="cannot read schema file"):
        load_schema(tmp_path / "nope.json")


def test_unknown_table_lookup_names_known_tables():
    schema = parse_schema({"t": table()})
    with pytest.raises(SchemaError, match="'nope' is not in schema.json .known: t"):
        schema.table("nope")


@given(st.text(min_size=1, max_size=20).filter(lambda s: not (set(s) & {'"', "'", "\x00"})))
def test_identifiers_without_quotes_or_nul_are_accepted_or_refused_with_a_reason(name):
    try:
        assert check_identifier(name) == name
    except ValueError as e:
        assert str(e)  # only length, surrounding spaces or a reserved prefix may refuse it
        assert (
            name != name.strip() or len(name.encode()) > 63 or name.lower().startswith(("sqlite_", "_cf_", "_d1sync"))
        )


@pytest.mark.parametrize("name", ["order", "select", "my column", "naïve_ütf", "表"])
def test_hostile_but_quotable_identifiers_are_accepted(name):
    schema = parse_schema({name: {"primaryKey": name, "columns": {name: "TEXT", "group": "INTEGER"}}})
    assert schema.tables[0].name == name


def test_unknown_key_lists_every_allowed_key_and_the_file_by_its_own_name(tmp_path):
    p = tmp_path / "prod-tables.json"
    p.write_text(json.dumps({"t": table(extra=1)}))
    with pytest.raises(SchemaError) as e:
        load_schema(p)
    said = str(e.value)
    assert said.startswith("prod-tables.json: table 't', field 'extra': unknown key")
    for key in ("primaryKey", "columns", "indexes", "target", "sourceSchema", "owners", "tags"):
        assert key in said
    assert "schema.json" not in said
