"""What the operator's view costs: D1 rows read per check, Dagster event rows per table, a run of 200 tables.

    .venv/bin/python benchmarks/operator_cost.py [--rows 1000000] [--changes 2000] [--stream-seconds 60]

1. The row check on a table of `--rows` rows in the D1 stand-in (d1stub/, the real D1 engine: `rows_read` is
   what D1 bills), after an apply of `--changes` changes: the whole-table count (what every evaluation read
   before) against the comparison of the changed rows by key (what it reads now), and what each comes to a
   day at the cadences the checks ran at.
2. Dagster event rows a streaming run writes per changed table and minute, with a writer at 200 changes/s:
   a record every 2 s (the old default) against every 60 s (the default now, with the checks and the
   source's observation on each record). Event rows and their JSON bytes, counted in the run's event log.
3. A schema of 200 tables with one changed: the apply run the sensor requests (the changed table alone),
   against a run of every table with nothing to do (what each sensor run was before): Dagster events,
   D1 requests, seconds; and the schema's load, setup and a sensor tick.
4. A streaming run over those 200 tables while 20 of them change: Dagster event rows and D1 requests a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg  # noqa: E402
from dagster._serdes import serialize_value  # noqa: E402

from benchmarks.common import d1_standin, fresh_database, writer  # noqa: E402
from d1sync_dagster.clients.d1_local import LocalD1Client  # noqa: E402
from d1sync_dagster.clients.pgmq import PgmqClient  # noqa: E402
from d1sync_dagster.config import d1_settings  # noqa: E402
from d1sync_dagster.definitions import APPLY_JOB, build_definitions  # noqa: E402
from d1sync_dagster.defs.resources import PostgresResource  # noqa: E402
from d1sync_dagster.engine.apply import ApplyOptions, apply  # noqa: E402
from d1sync_dagster.engine.backfill import backfill  # noqa: E402
from d1sync_dagster.engine.health import ChangedKeys, table_health  # noqa: E402
from d1sync_dagster.engine.setup import setup  # noqa: E402
from d1sync_dagster.schema import load_schema  # noqa: E402
from d1sync_dagster.sql.capture import example_source_tables  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def check_cost(rows: int, changes: int) -> dict[str, int]:
    schema = load_schema(ROOT / "schema.json")
    table = schema.table("apps")
    with fresh_database() as url, d1_standin() as env, PgmqClient(url) as pg:
        pg.execute(example_source_tables())
        d1 = d1_settings(env).client()
        setup(pg, d1, schema)
        pg.execute("ALTER TABLE apps DISABLE TRIGGER USER")
        pg.execute(f"INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 7.0 FROM generate_series(1, {rows}) g")
        pg.execute("ALTER TABLE apps ENABLE TRIGGER USER")
        backfill(pg, d1, schema, tables=["apps"], chunk_size=20_000)
        pg.execute(
            f"UPDATE apps SET name = name || '.' WHERE id IN (SELECT (g * 7919) % {rows} + 1 "
            f"FROM generate_series(1, {changes}) g)"
        )
        changed = ChangedKeys(schema)
        report = apply(pg, d1, schema, ApplyOptions(on_batch_messages=lambda _r, m, t: changed.add(m, t)))
        touched = changed.take()
        (res,) = d1.query(f"SELECT count(*) AS n FROM {table.target}")
        keyed = table_health(pg, d1, schema, tables=["apps"], keys=touched.keys)["apps"]
        d1.close()
        return {
            "rows": rows,
            "changes_applied": report.messages,
            "count_rows_read": res.rows_read,
            "keyed_rows_compared": keyed.changed_keys,
            "keyed_d1_rows_read": keyed.d1_rows_read,
        }


def _about(event: object) -> str | None:
    """The table an event is about: a materialization, a check evaluation or an observation of its D1 asset
    or of its Postgres source (the last part of the asset key)."""
    if event is None:
        return None
    key = getattr(event, "asset_key", None) or getattr(getattr(event, "event_specific_data", None), "asset_key", None)
    return key.path[-1] if key is not None else None


def stream_events(record_every: float, seconds: float) -> dict[str, float]:
    """One streaming run under a 200 changes/s writer; the event rows it wrote per changed table."""
    schema_file = str(ROOT / "schema.json")
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        d1_path = str(Path(tmp) / "d1.sqlite")
        with PgmqClient(url) as pg:
            pg.execute(example_source_tables())
            setup(pg, LocalD1Client(d1_path), load_schema(schema_file))
        saved = dict(os.environ)
        os.environ |= {"D1SYNC_APPLY_MODE": "stream", "DATABASE_URL": url, "D1_LOCAL_PATH": d1_path}
        os.environ.pop("D1SYNC_SCHEMA", None)
        job = build_definitions(schema_file).resolve_job_def("d1sync_stream")
        stop, written = threading.Event(), [0]
        w = threading.Thread(target=writer, args=(url, 200, seconds + 30, stop, written))
        w.start()
        try:
            config = {
                "ops": {"d1sync_stream_op": {"config": {"seconds": seconds, "record_every_seconds": record_every}}}
            }
            result = job.execute_in_process(run_config=config, instance=instance)
        finally:
            stop.set()
            w.join()
            os.environ.clear()
            os.environ.update(saved)  # (fresh_database reads DATABASE_URL)
        records = instance.get_records_for_run(result.run_id, limit=1_000_000).records
        per_table = [r for r in records if _about(r.event_log_entry.dagster_event) == "apps"]
        size = sum(len(serialize_value(r.event_log_entry)) for r in per_table)
        minutes = seconds / 60
        mats = sum(1 for r in per_table if r.event_log_entry.dagster_event.event_type_value == "ASSET_MATERIALIZATION")
        return {
            "record_every_seconds": record_every,
            "materializations_per_minute": round(mats / minutes, 1),
            "event_rows_per_minute": round(len(per_table) / minutes, 1),
            "event_bytes_per_row": round(size / max(len(per_table), 1)),
            "event_rows_per_day": round(len(per_table) / minutes * 1440),
            "event_mb_per_day": round(size / minutes * 1440 / 1e6, 1),
        }


def wide_schema_run() -> dict[str, dict[str, Any]]:
    tables = {f"t{i:03d}": {"primaryKey": ["id"], "columns": {"id": "INTEGER", "v": "TEXT"}} for i in range(200)}
    out = {}
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schema.json"
        path.write_text(json.dumps(tables))
        d1_path = str(Path(tmp) / "d1.sqlite")
        t0 = time.monotonic()
        schema = load_schema(path)
        loaded = time.monotonic() - t0
        with PgmqClient(url) as pg:
            for name in tables:
                pg.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, v text)")
            t0 = time.monotonic()
            setup(pg, LocalD1Client(d1_path), schema)
            set_up = time.monotonic() - t0
        saved = dict(os.environ)
        os.environ |= {"D1SYNC_SCHEMA": str(path), "D1SYNC_APPLY_MODE": "run", "DATABASE_URL": url}
        os.environ["D1_LOCAL_PATH"] = d1_path
        t0 = time.monotonic()
        defs = build_definitions(str(path))
        job = defs.resolve_job_def(APPLY_JOB)
        built = time.monotonic() - t0
        resources = {"postgres": PostgresResource(database_url=url)}
        with dg.instance_for_test() as instance:
            ticks = []
            for _ in range(5):
                ctx = dg.build_sensor_context(instance=instance, resources=resources)
                t0 = time.monotonic()
                defs.resolve_sensor_def("pgmq_depth_sensor").evaluate_tick(ctx)
                ticks.append(time.monotonic() - t0)
        out["scale"] = {
            "load_schema_s": round(loaded, 3),
            "setup_s": round(set_up, 2),
            "definitions_s": round(built, 2),
            "sensor_tick_ms": round(sorted(ticks)[2] * 1000, 1),
        }
        for case in ("one table changed, as the sensor selects it", "every table selected, nothing to do"):
            with dg.instance_for_test() as instance, PgmqClient(url) as pg:
                selection = None
                if case.startswith("one"):
                    pg.execute("INSERT INTO t042 VALUES (1, 'a'), (2, 'b')")
                    ctx = dg.build_sensor_context(instance=instance, resources=resources)
                    (req,) = defs.resolve_sensor_def("pgmq_depth_sensor").evaluate_tick(ctx).run_requests
                    selection = req.asset_selection
                opened.clear()
                started = time.monotonic()
                result = job.execute_in_process(
                    instance=instance,
                    run_config={"ops": {"d1_incremental_apply": {"config": {"record_unchanged": False}}}},
                    asset_selection=selection,
                )
                seconds = time.monotonic() - started
                events = instance.get_records_for_run(result.run_id, limit=1_000_000).records
                mats = result.get_asset_materialization_events()
                requests = mats[0].event_specific_data.materialization.metadata["run_d1_requests"].value if mats else 0
                out[case] = {
                    "seconds": round(seconds, 2),
                    "dagster_events": len(events),
                    "materializations": len(mats),
                    "check_evaluations": len(result.get_asset_check_evaluations()),
                    "apply_d1_requests": requests,
                    "d1_requests": sum(c.requests for c in opened),
                }
        os.environ.clear()
        os.environ.update(saved)
    return out


def wide_stream(seconds: float) -> dict[str, float]:
    """A streaming run over a schema of 200 tables while a writer changes 20 of them, 200 changes/s in all:
    the Dagster events and D1 requests a minute."""
    import psycopg

    tables = {f"t{i:03d}": {"primaryKey": ["id"], "columns": {"id": "INTEGER", "v": "TEXT"}} for i in range(200)}
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        path = Path(tmp) / "schema.json"
        path.write_text(json.dumps(tables))
        d1_path = str(Path(tmp) / "d1.sqlite")
        with PgmqClient(url) as pg:
            for name in tables:
                pg.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, v text)")
            setup(pg, LocalD1Client(d1_path), load_schema(path))
        saved = dict(os.environ)
        os.environ |= {"D1SYNC_SCHEMA": str(path), "D1SYNC_APPLY_MODE": "stream", "DATABASE_URL": url}
        os.environ["D1_LOCAL_PATH"] = d1_path
        stop = threading.Event()

        def write() -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    for t in range(0, 200, 10):  # 20 tables, one row each, every 100 ms
                        conn.execute(f"INSERT INTO t{t:03d} VALUES (%s, 'v')", [i])
                    i += 1
                    time.sleep(0.1)

        w = threading.Thread(target=write)
        w.start()
        opened.clear()
        try:
            job = build_definitions(str(path)).resolve_job_def("d1sync_stream")
            config = {"ops": {"d1sync_stream_op": {"config": {"seconds": seconds}}}}
            result = job.execute_in_process(run_config=config, instance=instance)
        finally:
            stop.set()
            w.join()
            os.environ.clear()
            os.environ.update(saved)
        records = instance.get_records_for_run(result.run_id, limit=1_000_000).records
        minutes = seconds / 60
        return {
            "event_rows_per_minute": round(len(records) / minutes, 1),
            "materializations": len(result.get_asset_materialization_events()),
            "check_evaluations": len(result.get_asset_check_evaluations()),
            "d1_requests_per_minute": round(sum(c.requests for c in opened) / minutes, 1),
        }


#: Every local D1 client the runs open in this process (the resource's): their requests are counted.
opened: list[LocalD1Client] = []
_init = LocalD1Client.__init__


def _counted_init(self: LocalD1Client, *a: object, **kw: object) -> None:
    _init(self, *a, **kw)  # type: ignore[arg-type]
    opened.append(self)


LocalD1Client.__init__ = _counted_init  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--changes", type=int, default=2000)
    ap.add_argument("--stream-seconds", type=float, default=60.0)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: checks, events, wide, widestream")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    if "checks" not in skip:
        c = check_cost(args.rows, args.changes)
        print(
            f"row check on a {c['rows']:,}-row table after {c['changes_applied']:,} changes (D1 stand-in, rows_read):"
        )
        print(f"  whole-table count (before)    {c['count_rows_read']:,} D1 rows read per evaluation")
        print(
            f"  changed rows by key (now)     {c['keyed_d1_rows_read']:,} D1 rows read for "
            f"{c['keyed_rows_compared']:,} rows compared (at most 1,000 per evaluation)"
        )
        per_run, per_stream = c["count_rows_read"] * 2880, c["count_rows_read"] * 96
        print(f"  a day, before: {per_run:,} (per-run mode, every 30 s) or {per_stream:,} (the stream, every 15 min)")
        print(f"  a day, now: at most {1000 * 1440:,} (one record a minute, 1,000 rows compared at most)")
        print(json.dumps({"checks": c}))
    if "events" not in skip:
        for every in (2.0, 60.0):
            e = stream_events(every, args.stream_seconds)
            print(
                f"stream at 200 changes/s, a record every {every:g} s: {e['materializations_per_minute']} "
                f"materializations and {e['event_rows_per_minute']} event rows a minute for the table "
                f"({e['event_bytes_per_row']} bytes each): {e['event_rows_per_day']:,} rows, "
                f"{e['event_mb_per_day']} MB a day"
            )
            print(json.dumps({"events": e}))
    if "wide" not in skip:
        wide = wide_schema_run()
        scale = wide.pop("scale")
        print(
            f"200 tables: schema.json loads in {scale['load_schema_s']} s, setup {scale['setup_s']} s, the "
            f"definitions {scale['definitions_s']} s, a sensor tick (empty queue, median of 5) "
            f"{scale['sensor_tick_ms']} ms"
        )
        for case, w in wide.items():
            print(
                f"200 tables, {case}: {w['seconds']} s, {w['dagster_events']} Dagster events, "
                f"{w['materializations']} materializations, {w['check_evaluations']} check evaluations, "
                f"{w['d1_requests']} D1 requests ({w['apply_d1_requests']} by the apply)"
            )
        print(json.dumps({"wide": w}))
    if "widestream" not in skip:
        ws = wide_stream(args.stream_seconds)
        print(
            f"200 tables, streaming for {args.stream_seconds:g} s while 20 of them change (200 changes/s): "
            f"{ws['event_rows_per_minute']} Dagster event rows and {ws['d1_requests_per_minute']} D1 requests a "
            f"minute ({ws['materializations']} materializations, {ws['check_evaluations']} check evaluations in all)"
        )
        print(json.dumps({"widestream": ws}))


if __name__ == "__main__":
    main()
