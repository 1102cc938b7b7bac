"""The shard routing function (`core/shards.py`), its properties, how changes are routed, and the readers'
TypeScript function (`readers/shard.ts`) agreeing with it on every key type."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d1sync_dagster.core.batch import plan_batch, route_changes
from d1sync_dagster.core.changes import Change
from d1sync_dagster.core.shards import ShardRule, jump, key_hash, key_text, rule_from_json, shard_for, spread
from d1sync_dagster.schema import parse_schema
from tests.conftest import ROOT, STANDIN

SCHEMA = parse_schema(
    {"d": {"primaryKey": "id", "columns": {"id": "INTEGER", "tenant": "TEXT", "v": "TEXT"}, "indexes": [["tenant"]]}}
)
HASH = rule_from_json("d", {"column": "tenant", "hash": ["a", "b", "c", "d"]})
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_key_text_is_what_d1_holds_as_text():
    assert [key_text(v) for v in (42, -7, 0, True, False, None, "Acme", "")] == [
        "42",
        "-7",
        "0",
        "1",
        "0",
        "",
        "Acme",
        "",
    ]
    with pytest.raises(TypeError):
        key_text(1.5)


@given(key=st.integers(min_value=0, max_value=2**64 - 1), n=st.integers(min_value=1, max_value=300))
def test_jump_is_in_range_and_growing_moves_keys_only_to_the_new_bucket(key, n):
    b = jump(key, n)
    assert 0 <= b < n
    grown = jump(key, n + 1)
    assert grown == b or grown == n


@given(values=st.lists(st.text(max_size=20), min_size=1, max_size=30))
def test_every_value_has_exactly_one_shard_among_the_rules(values):
    rule = rule_from_json("d", {"column": "tenant", "map": {"vip": "x"}, "hash": ["a", "b"]})
    assert {rule.route(v) for v in values} <= {"a", "b", "x"}
    assert rule.route("vip") == "x"
    assert sum(spread(rule, values).values()) == len(values)


def test_hashing_spreads_values_evenly():
    counts = spread(HASH, [f"tenant-{i}" for i in range(8000)])
    assert all(1700 < n < 2300 for n in counts.values()), counts


def test_a_map_routes_named_values_and_sends_the_rest_to_its_default():
    rule = rule_from_json("d", {"column": "tenant", "map": {"acme": "eu", "7": "us"}, "default": "ap"})
    assert [rule.route(v) for v in ("acme", 7, "7", "other", None)] == ["eu", "us", "us", "ap", "ap"]
    assert rule.shards == ("ap", "eu", "us")


@pytest.mark.parametrize(
    "data, says",
    [
        ({"column": "t", "map": {"a": "x"}}, "give `hash`"),
        ({"column": "t", "hash": ["a"], "default": "b"}, "not both"),
        ({"column": "t", "hash": ["a", "a"]}, "twice"),
        ({"hash": ["a"]}, "`column`"),
        ({"column": "t", "hash": "a"}, "list of shard names"),
        ({"column": "t", "hash": ["a"], "modulo": 3}, "unknown field"),
    ],
)
def test_a_bad_rule_is_refused_with_what_to_write(data, says):
    with pytest.raises(ValueError, match=says):
        rule_from_json("d", data)


def ch(op, key, row=None, old=None, **kw):
    return Change(1, "d", op, (key,), row, old=old, **kw)


def test_changes_route_by_row_and_a_move_deletes_in_the_old_shard():
    rules = {"d": rule_from_json("d", {"column": "tenant", "map": {"x": "one", "y": "two"}, "default": "one"})}
    move = ch("upsert", 1, {"id": 1, "tenant": "y", "v": "b"}, old={"id": 1, "tenant": "x", "v": "a"})
    stay = ch("upsert", 2, {"id": 2, "tenant": "x", "v": "b"}, old={"id": 2, "tenant": "x", "v": "a"})
    gone = ch("delete", 3, old={"id": 3, "tenant": "y", "v": "a"})
    key_only = ch("delete", 4, old={"id": 4})
    out = route_changes(SCHEMA, rules, [move, stay, gone, key_only, Change(1, "d", "truncate")])
    assert [(c.op, c.key) for c in out["one"]] == [
        ("delete", (1,)),
        ("upsert", (2,)),
        ("delete", (4,)),
        ("truncate", ()),
    ]
    assert [(c.op, c.key) for c in out["two"]] == [
        ("upsert", (1,)),
        ("delete", (3,)),
        ("delete", (4,)),
        ("truncate", ()),
    ]
    # A change meant for one shard reaches only that one; an upsert there only if its row belongs there.
    only = route_changes(
        SCHEMA,
        rules,
        [
            ch("delete", 5, old={"id": 5, "tenant": "y"}, shard="one"),
            ch("upsert", 6, {"id": 6, "tenant": "y", "v": ""}, shard="one"),
        ],
    )
    assert [(s, [c.key for c in cs]) for s, cs in only.items()] == [("one", [(5,)])]


class _Msg:
    def __init__(self, msg_id, message):
        self.msg_id, self.message = msg_id, message


def test_a_backfill_chunk_is_split_by_shard_and_keeps_only_its_shard_when_told():
    rows = [[i, f"t{i % 10}", "v"] for i in range(200)]
    chunk = {"type": "BACKFILL", "table": "d", "columns": ["id", "tenant", "v"], "rows": rows}
    planned = plan_batch(SCHEMA, [_Msg(1, chunk)], {"d": HASH}).planned
    per_shard = {p.shard: 0 for p in planned}
    for p in planned:
        per_shard[p.shard] += p.rows
    assert per_shard == {s: n for s, n in spread(HASH, [r[1] for r in rows]).items() if n}
    only = plan_batch(SCHEMA, [_Msg(1, chunk | {"shard": "b"})], {"d": HASH}).planned
    assert {p.shard for p in only} == {"b"} and sum(p.rows for p in only) == per_shard["b"]


def _cases():
    """Values of every kind a shard column holds, each with how a reader passes it in JavaScript."""
    ints = [0, 1, -1, 42, 2**31, -(2**31) - 1, 2**53 - 1, 2**53 + 1, 2**63 - 1, -(2**63)]
    texts = ["", "acme", "Ünïcödé", "日本語", "emoji 🎉", "a'b\"c", str(uuid.UUID(int=12345)), "42"]
    out = []
    for v in ints:
        out.append({"value": v, "js": v if abs(v) < 2**53 else str(v)})
        out.append({"value": v, "js": str(v), "bigint": True})
    out += [{"value": t, "js": t} for t in texts]
    out += [{"value": True, "js": True}, {"value": False, "js": False}, {"value": None, "js": None}]
    return out


RULES = [
    {"column": "c", "hash": ["s0", "s1", "s2", "s3"]},
    {"column": "c", "hash": [f"s{i}" for i in range(16)]},
    {"column": "c", "hash": [f"s{i}" for i in range(6)], "map": {"acme": "vip", "42": "vip"}},
    {"column": "c", "map": {"acme": "eu", "-1": "us", "": "nulls"}, "default": "ap"},
]


def test_the_typescript_reader_agrees_with_the_engine_on_every_key_type(tmp_path):
    node = STANDIN / "node_modules" / ".bin" / "node"
    if not node.exists():
        if shutil.which("npm") is None:
            pytest.fail("this test runs readers/shard.ts with the stand-in's node (cd d1stub && npm ci)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=STANDIN, check=True)
    cases = _cases() + [{"value": f"tenant-{i}", "js": f"tenant-{i}"} for i in range(300)]
    script = tmp_path / "agree.mjs"
    script.write_text(
        f"import {{ shardFor, keyHash }} from {json.dumps(str(ROOT / 'readers' / 'shard.ts'))};\n"
        "import { readFileSync } from 'node:fs';\n"
        + "const {rules, cases} = JSON.parse(readFileSync(process.argv[2], 'utf8'));\n"
        "const out = rules.map(r => cases.map(c => shardFor(r, c.bigint ? BigInt(c.js) : c.js)));\n"
        "const hashes = cases.filter(c => typeof c.js === 'string').map(c => keyHash(c.js).toString());\n"
        "console.log(JSON.stringify({out, hashes}));\n"
    )
    data = tmp_path / "cases.json"
    data.write_text(json.dumps({"rules": RULES, "cases": cases}))
    res = subprocess.run(
        [str(node), "--experimental-strip-types", "--no-warnings", str(script), str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(res.stdout)
    want = [[shard_for(r, c["value"]) for c in cases] for r in RULES]
    assert got["out"] == want
    assert got["hashes"] == [str(key_hash(c["js"])) for c in cases if isinstance(c["js"], str)]


@settings(max_examples=50)
@given(values=st.lists(st.one_of(INT64, st.text(max_size=12), st.none(), st.booleans()), min_size=1, max_size=20))
def test_the_rule_survives_its_json_form(values):
    rule = ShardRule("d", "tenant", (("vip", "x"),), ("a", "b", "c"))
    again = rule_from_json("d", json.loads(json.dumps(rule.to_json())))
    assert [again.route(v) for v in values] == [rule.route(v) for v in values]
