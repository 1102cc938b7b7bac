"""The plain schema the planner process plans with (`core/tables.py`) reads as the validated one does, and
the package gives the schema's names without importing them up front."""

from __future__ import annotations

import subprocess
import sys

import pytest

import d1sync_dagster
from d1sync_dagster.core.tables import PlainSchema
from d1sync_dagster.errors import SchemaError
from d1sync_dagster.schema import Schema, load_schema
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")


def test_the_plain_schema_reads_as_the_validated_one():
    plain = PlainSchema.of(SCHEMA)
    assert plain.names == SCHEMA.names
    for t in SCHEMA.tables:
        p = plain.table(t.name)
        assert (p.name, p.target, p.key, p.columns) == (t.name, t.target, tuple(t.key), dict(t.columns))
        assert plain.by_name[t.name] is p


def test_an_unknown_table_is_refused_in_the_same_words():
    with pytest.raises(SchemaError) as validated:
        SCHEMA.table("nope")
    with pytest.raises(SchemaError) as plain:
        PlainSchema.of(SCHEMA).table("nope")
    assert str(plain.value) == str(validated.value)


def test_the_package_gives_the_schema_names_on_first_use():
    assert d1sync_dagster.Schema is Schema
    assert d1sync_dagster.load_schema is load_schema
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        d1sync_dagster.nope  # noqa: B018
    out = subprocess.run(
        [sys.executable, "-c", "import sys, d1sync_dagster.core.batch; print('pydantic' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert out.stdout.strip() == "False"
