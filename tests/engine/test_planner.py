"""The planner process (`engine/planner.py`): it plans exactly what the apply's own process would, a drain
through it converges and is exact under a crash, and when it dies the apply carries on at home."""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d1sync_dagster.clients.pgmq import QueueMessage
from d1sync_dagster.core.batch import plan_batch
from d1sync_dagster.core.shards import rule_from_json
from d1sync_dagster.core.tables import PlainSchema
from d1sync_dagster.engine import planner as planner_module
from d1sync_dagster.engine.apply import ApplyOptions, apply, decoded
from d1sync_dagster.engine.planner import MIN_MESSAGES, Planner, _child_environment
from d1sync_dagster.schema import load_schema
from tests.conftest import ROOT

SCHEMA = load_schema(ROOT / "schema.json")
NOW = None


#: Numbers a double cannot hold, spelled into the JSON text as Postgres would send them (a numeric column).
LONG_NUMBERS = {"@n1": "0.30000000000000004441", "@n2": "123456789012345678901234", "@n3": "1.5e-400"}


def text_messages(rows: list[dict]) -> list[QueueMessage]:
    def text(row: dict) -> str:
        out = json.dumps(row)
        for mark, number in LONG_NUMBERS.items():
            out = out.replace(f'"{mark}"', number)
        return out

    return [QueueMessage(i + 1, 0, NOW, text(r).encode()) for i, r in enumerate(rows)]


values = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.sampled_from(list(LONG_NUMBERS)),
)  # fmt: skip


@st.composite
def changes(draw):
    out = []
    for _ in range(draw(st.integers(1, 40))):
        key = draw(st.integers(1, 6))
        kind = draw(st.sampled_from(["INSERT", "UPDATE", "DELETE", "TRUNCATE", "BOGUS"]))
        record = {"id": key, "name": draw(values), "rating": draw(values), "owner_id": draw(values)}
        record |= {"is_public": draw(values), "settings": draw(values), "icon": None, "created_at": draw(values)}
        old = record | {"name": draw(values)} if draw(st.booleans()) else None
        out.append({"type": kind, "table": "apps", "record": record, "old_record": old})
    return out


def wait_ready(p: Planner) -> Planner:
    deadline = time.monotonic() + 30
    while not p.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.ready
    return p


def started() -> Planner:
    return wait_ready(
        Planner(SCHEMA, {"apps": rule_from_json("apps", {"column": "owner_id", "hash": ["a", "b", "c"]})})
    )


@pytest.fixture
def ready_at_once(monkeypatch):
    """The apply's planner process is ready before the first batch is planned (in a real drain it starts in
    the background, and a short one may end before it is ready)."""
    real_init = Planner.__init__

    def init(self, *args):
        real_init(self, *args)
        wait_ready(self)

    monkeypatch.setattr(Planner, "__init__", init)


@pytest.fixture(scope="module")
def planner():
    p = started()
    yield p
    p.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=changes())
def test_the_planner_process_plans_exactly_what_this_process_plans(planner, batch):
    msgs = text_messages(batch)
    rules = {"apps": rule_from_json("apps", {"column": "owner_id", "hash": ["a", "b", "c"]})}
    assert planner.submit(msgs).result(timeout=30) == plan_batch(SCHEMA, decoded(msgs), rules)


def test_a_planner_that_dies_hands_its_batches_back_and_the_drain_stays_exact(local_pair, monkeypatch, ready_at_once):
    pair = local_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 3000) g")
    pair.sql("UPDATE apps SET name = name || 'b'")
    handed = []
    real_submit = Planner.submit

    def submit_then_die(self, msgs):
        future = real_submit(self, msgs)
        handed.append(len(msgs))
        if len(handed) == 2:
            self._proc.send_signal(signal.SIGKILL)  # the child dies with batches in its hands
        return future

    monkeypatch.setattr(Planner, "submit", submit_then_die)
    report = pair.apply(batch_size=MIN_MESSAGES)
    assert report.drained and report.messages == 6000 and report.dead_lettered == 0
    assert len(handed) >= 2  # the planner took batches before it died
    pair.assert_in_sync()


def test_a_planner_not_ready_in_time_is_given_up_and_the_drain_stays_exact(local_pair, monkeypatch):
    """Batches handed to a child that is still starting wait for it, but not past `START_SECONDS`: then it
    is killed and they, and every later batch, are planned at home."""
    pair = local_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 3000) g")
    pair.sql("UPDATE apps SET name = name || 'b'")
    monkeypatch.setattr(Planner, "START_SECONDS", 0.0)
    started_planners: list[Planner] = []
    real_init = Planner.__init__

    def init(self, *args):
        real_init(self, *args)
        started_planners.append(self)

    monkeypatch.setattr(Planner, "__init__", init)
    report = pair.apply(batch_size=MIN_MESSAGES)
    assert report.drained and report.messages == 6000 and report.dead_lettered == 0
    assert len(started_planners) == 1 and not started_planners[0].ready
    assert started_planners[0]._proc.poll() is not None  # killed, not left behind
    pair.assert_in_sync()


def test_a_frame_that_cannot_be_written_sends_the_batches_home(local_pair, monkeypatch):
    pair = local_pair
    pair.sql("INSERT INTO apps (id, name) SELECT g, 'a' FROM generate_series(1, 4000) g")
    pair.sql("UPDATE apps SET name = name || 'b'")
    real_send = planner_module._send
    frames = []

    def send(stream, obj):
        frames.append(obj)
        if len(frames) == 3:  # the schema, one batch, then this one
            raise pickle.PicklingError("cannot pickle this frame")
        real_send(stream, obj)

    monkeypatch.setattr(planner_module, "_send", send)
    report = pair.apply(batch_size=MIN_MESSAGES)
    assert report.drained and report.messages == 8000 and report.dead_lettered == 0
    assert len(frames) == 3
    pair.assert_in_sync()


def test_a_drain_through_the_planner_converges_and_small_batches_stay_at_home(local_pair, monkeypatch, ready_at_once):
    pair = local_pair
    rng = random.Random(5)
    pair.sql("INSERT INTO apps (id, name, rating) SELECT g, 'n', g / 3.0 FROM generate_series(1, 4000) g")
    for i in range(5):
        pair.sql("UPDATE apps SET rating = rating * 1.5, name = name || 'x' WHERE id %% 7 <> %s", [i])
        pair.sql("DELETE FROM apps WHERE id = %s", [rng.randint(1, 4000)])
    used = []
    real_submit = Planner.submit
    monkeypatch.setattr(Planner, "submit", lambda self, msgs: used.append(len(msgs)) or real_submit(self, msgs))
    report = pair.apply(batch_size=MIN_MESSAGES)
    assert report.drained
    assert len(used) >= 4 and all(n >= MIN_MESSAGES for n in used)  # whole transactions: pages of 4000, 3428
    assert report.planner_peak_mb is not None and 5 < report.planner_peak_mb < 500  # its own peak, reported
    pair.assert_in_sync()
    pair.sql("UPDATE apps SET name = 'small' WHERE id < 50")
    used.clear()
    assert pair.apply(batch_size=MIN_MESSAGES).messages == 49 and used == []  # a small batch is planned at home
    pair.assert_in_sync()


def test_a_consumer_killed_mid_batch_while_the_planner_plans_replays_in_order(local_pair, source_db, tmp_path):
    """SIGKILL between a planned batch's D1 commit and its delete: the planner process goes with its parent
    (its stdin closes) and the next apply replays everything in order."""
    pair = local_pair
    for lo in range(0, 2500, 500):  # transactions of 500 changes: pages of 1,000 hold two each
        insert = "INSERT INTO apps (id, name) SELECT g, 'v1' FROM generate_series(%s::int, %s::int) g"
        pair.sql(insert, [lo + 1, lo + 500])
    for lo in range(0, 1500, 500):
        pair.sql("UPDATE apps SET name = 'v2' WHERE id > %s AND id <= %s", [lo, lo + 500])
    code = (
        "import os, signal, sys\n"
        "from d1sync_dagster.clients.d1_local import LocalD1Client\n"
        "from d1sync_dagster.clients.pgmq import PgmqClient\n"
        "from d1sync_dagster.engine.apply import ApplyOptions, apply\n"
        "from d1sync_dagster.schema import load_schema\n"
        "import psutil\n"
        "batches = []\n"
        "def die(ids):\n"
        "    batches.append(ids)\n"
        "    if len(batches) == 3:\n"
        "        planners = [c.pid for c in psutil.Process().children() if 'planner' in ' '.join(c.cmdline())]\n"
        "        open(sys.argv[4], 'w').write(' '.join(map(str, planners)))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "with PgmqClient(sys.argv[1]) as pg:\n"
        "    apply(pg, LocalD1Client(sys.argv[2]), load_schema(sys.argv[3]), ApplyOptions(batch_size=1000),\n"
        "          after_d1_commit=die)\n"
    )
    pids = tmp_path / "planners"
    args = [source_db, str(pair.d1.path), str(ROOT / "schema.json"), str(pids)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert pair.queue_depth() == 4000 - 2000  # two batches finished, the third landed in D1 but stayed queued
    assert pair.apply().drained
    pair.assert_in_sync()
    planners = [int(p) for p in pids.read_text().split()]
    assert planners, "the killed apply had a planner process"
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in planners):
        assert time.monotonic() < deadline, "a planner process outlived its parent"
        time.sleep(0.1)


def test_the_planners_peak_memory_is_its_own_not_its_parents_at_the_spawn():
    """getrusage(RUSAGE_CHILDREN) counts the parent's resident size at the spawn; VmHWM does not."""
    ballast = bytearray(200 * 2**20)
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))  # resident, not just reserved
    p = started()
    try:
        own = p.peak_mb()
    finally:
        p.close()
    assert own is not None and 5 < own < 150
    assert planner_module.resident_peak_mb() > 200  # this process, with its ballast
    assert planner_module.resident_peak_mb(2**31) is None  # no such process
    del ballast


def test_the_child_plans_without_loading_pydantic(planner):
    """What the child imports and unpickles (the plain schema, the rules) and plans with leaves pydantic out:
    its models cost that process more memory than a batch does. The plan is the one made here."""
    script = (
        "import pickle, sys\n"
        "from d1sync_dagster.engine.planner import _Msg\n"
        "from d1sync_dagster.core.batch import plan_batch\n"
        "from d1sync_dagster.exactjson import loads_exact\n"
        "schema, rules, msgs = pickle.loads(sys.stdin.buffer.read())\n"
        "out = plan_batch(schema, [_Msg(i, loads_exact(t)) for i, t in msgs], rules)\n"
        "assert 'pydantic' not in sys.modules, 'the planner loaded pydantic'\n"
        "sys.stdout.buffer.write(pickle.dumps(out))\n"
    )
    rules = {"apps": rule_from_json("apps", {"column": "owner_id", "hash": ["a", "b", "c"]})}
    row = {"id": 1, "owner_id": "o1", "name": "a", "is_public": True, "settings": {"k": [1]}, "rating": "@n1"}
    row |= {"icon": None, "created_at": 5}
    batch = [
        {"type": "INSERT", "table": "apps", "record": row, "old_record": None},
        {"type": "UPDATE", "table": "apps", "record": row | {"owner_id": "o2"}, "old_record": row},
        {"type": "INSERT", "table": "nope", "record": {"id": 2}, "old_record": None},
    ]
    msgs = text_messages(batch)
    payload = pickle.dumps((PlainSchema.of(SCHEMA), rules, [(m.msg_id, m.message) for m in msgs]))
    out = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, check=True, env=_child_environment()
    )
    planned = pickle.loads(out.stdout)
    assert planned == plan_batch(SCHEMA, decoded(msgs), rules)
    assert planned.planned and planned.poison  # both kinds were in the batch


def test_the_child_runs_this_copy_of_d1sync():
    assert planner_module.__file__.startswith(str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", "import d1sync_dagster.engine.planner as p; print(p.__file__)"],
        capture_output=True, text=True, cwd="/", env={"PYTHONPATH": str(ROOT)}, check=True,
    )  # fmt: skip
    assert out.stdout.strip().startswith(str(ROOT))
    assert ApplyOptions().planner_process is True and callable(apply)


def test_the_child_gets_no_secret_from_the_environment(monkeypatch):
    from d1sync_dagster.engine.planner import _child_environment

    monkeypatch.setenv("DATABASE_URL", "postgresql://u:S3cret@db/x")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "tok-123")
    monkeypatch.setenv("PROD_CLOUDFLARE_API_TOKEN", "tok-456")
    env = _child_environment()
    assert not any(v in " ".join(env.values()) for v in ("S3cret", "tok-123", "tok-456"))
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)


def test_many_large_batches_handed_over_at_once_do_not_deadlock_the_pipes(planner):
    """Each batch and each answer is far larger than a pipe's buffer: handing over many at once must not
    leave the child blocked writing an answer while this process is blocked writing the next batch."""
    row = {"id": 1, "name": "x" * 200, "rating": 1.5, "owner_id": "o", "is_public": True, "settings": {"a": 1}}
    row |= {"icon": None, "created_at": 5}
    msgs = text_messages([{"type": "INSERT", "table": "apps", "record": row | {"id": i}} for i in range(3000)])
    futures = []
    handing = threading.Thread(target=lambda: futures.extend(planner.submit(msgs) for _ in range(12)), daemon=True)
    handing.start()
    handing.join(timeout=60)
    assert not handing.is_alive(), "handing batches over deadlocked"
    planned = [f.result(timeout=60) for f in futures]
    assert all(p is not None and sum(x.rows for x in p.planned) == 3000 for p in planned)
