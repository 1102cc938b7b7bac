"""init-schema against a real database with a spread of Postgres types, then the result replicates."""

import json

from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.engine.apply import apply
from d1sync_dagster.engine.introspect import introspect
from d1sync_dagster.engine.setup import setup
from d1sync_dagster.schema import parse_schema
from tests.helpers import Pair

DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE everything (
  region text, id bigint, small int2, medium int4, amount numeric(12, 2), ratio float4, score float8,
  ok bool, label varchar(20), ext_id uuid, doc json, docb jsonb, at timestamptz, day date, raw bytea,
  tags text[], nums int[], feeling mood, spot point,
  PRIMARY KEY (region, id)
);
CREATE INDEX everything_label ON everything (label);
CREATE INDEX everything_pair ON everything (ok, score);
CREATE INDEX everything_expr ON everything (lower(label));
CREATE TABLE no_key (a int);
"""


def test_types_keys_indexes_and_notes(pg_url, d1):
    with PgmqClient(pg_url) as pg:
        pg.execute(DDL)
        result = introspect(pg)
        assert list(result.schema) == ["everything"]
        e = result.schema["everything"]
        assert e["primaryKey"] == ["region", "id"]
        assert e["columns"] == {
            "region": "TEXT", "id": "INTEGER", "small": "INTEGER", "medium": "INTEGER", "amount": "TEXT",
            "ratio": "REAL", "score": "REAL", "ok": "BOOLEAN", "label": "TEXT", "ext_id": "TEXT", "doc": "JSON",
            "docb": "JSON", "at": "TEXT", "day": "TEXT", "raw": "BLOB", "tags": "JSON", "nums": "JSON",
            "feeling": "TEXT",
        }  # fmt: skip
        assert e["indexes"] == ["label", ["ok", "score"]]
        notes = "\n".join(result.notes)
        assert "everything.spot: left out: no D1 type for Postgres type point" in notes
        assert "public.no_key: left out: no primary key" in notes
        assert "everything_expr left out: expression or partial index" in notes

        # The written schema loads, and a table described by it replicates exactly.
        schema = parse_schema(json.loads(json.dumps(result.schema)))
        setup(pg, d1, schema)
        pg.execute(
            "INSERT INTO everything VALUES ('eu', 9007199254740993, 1, 2, 12345678.90, 1.5, 0.1, true, 'x', "
            "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{\"b\": 1, \"a\": 2}', '[1, {\"z\": null}]', "
            "'2024-02-29 12:00:00+02', '2024-02-29', '\\xff00', '{a,b}', '{1,2}', 'happy', '(1,2)')"
        )
        report = apply(pg, d1, schema)
        assert report.dead_lettered == 0
        Pair(pg, d1, schema).assert_in_sync()


def test_selected_tables_and_cli(pg_url, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    with PgmqClient(pg_url) as pg:
        pg.execute(DDL)
    out_file = tmp_path / "schema.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "D1_"))} | {"DATABASE_URL": pg_url}
    cmd = [sys.executable, "-m", "d1sync_dagster", "init-schema", "--tables", "everything", "--output", str(out_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "note: public.everything.spot: left out" in out.stderr and "wrote" in out.stdout
    assert list(json.loads(out_file.read_text())) == ["everything"]
    gen = subprocess.run(
        [sys.executable, "-m", "d1sync_dagster", "generate-sql", "--schema", str(out_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert gen.returncode == 0 and '"public"."everything"' in gen.stdout
