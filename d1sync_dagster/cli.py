"""The `d1sync` command: parses arguments, builds clients from the environment, calls engine functions.

Exit codes: 0 success, 1 the operation ran and found a problem (apply: messages were dead-lettered, or
another apply was running), 2 bad configuration or input, 3 a service
(Postgres or D1) failed or could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, replace
from typing import Any

from d1sync_dagster import config, embedded
from d1sync_dagster.clients.d1 import D1Client
from d1sync_dagster.clients.d1_shards import ShardedD1
from d1sync_dagster.clients.pgmq import PgmqClient
from d1sync_dagster.core.shards import shard_for
from d1sync_dagster.engine.apply import ApplyOptions, apply
from d1sync_dagster.engine.backfill import backfill
from d1sync_dagster.engine.compare import d1_rows, diff, pg_rows
from d1sync_dagster.engine.demo import example_writes
from d1sync_dagster.engine.doctor import capture_findings, diagnose
from d1sync_dagster.engine.introspect import introspect
from d1sync_dagster.engine.nuke import nuke
from d1sync_dagster.engine.position import freshness, wait_for_applied
from d1sync_dagster.engine.reconcile import reconcile
from d1sync_dagster.engine.reports import ApplyReport
from d1sync_dagster.engine.restore import restore
from d1sync_dagster.engine.setup import ensure_schema, setup, teardown_postgres
from d1sync_dagster.engine.status import status
from d1sync_dagster.errors import ConfigError, D1Error, D1SyncError, QueueError, SchemaError
from d1sync_dagster.schema import Schema, load_schema
from d1sync_dagster.sql.capture import dlq_name, example_source_tables, migration
from d1sync_dagster.sql.d1_ddl import schema_ddl
from d1sync_dagster.sql.quoting import ident
from d1sync_dagster.targets import Target, load_targets, open_shards, pick, targets_path
from d1sync_dagster.terminal import Progress, print_table


def _cmd_generate_sql(args: argparse.Namespace) -> int:
    schema = _schema(args)
    if args.sql == "d1":
        sys.stdout.write(";\n".join(schema_ddl(schema)) + ";\n")
    else:
        sys.stdout.write(migration(schema, queue=args.queue))
    return 0


def _cmd_setup(args: argparse.Namespace) -> int:
    schema = _schema(args)
    d1_settings = config.d1_settings()
    url = embedded.source_url()
    with PgmqClient(url, queue=args.queue) as pg:
        if args.create_example_tables:
            pg.execute(example_source_tables())
        with closing(_d1(args, d1_settings)) as d1:
            result = setup(pg, d1, schema, pgmq_sql=embedded.pgmq_sql() if args.install_pgmq else None)
    out = {
        "schema_version": result.schema_version,
        "tables": result.tables,
        "queue": args.queue,
        "d1_backend": d1_settings.backend,
        "added_columns": result.added_columns,
        "dropped_columns": result.dropped_columns,
        "dropped_indexes": result.dropped_indexes,
        "rebuilt_tables": result.rebuilt_tables,
        "backfilled_tables": result.backfilled_tables,
        "renamed_columns": result.renamed_columns,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"setup done: {len(result.tables)} tables ({', '.join(result.tables)}), queue {args.queue}, "
            f"schema version {result.schema_version}, D1 backend {d1_settings.backend}"
        )
        for label, items in (
            ("added column", result.added_columns),
            ("dropped column", result.dropped_columns),
            ("dropped index", result.dropped_indexes),
            ("rebuilt table (column type or key changed)", result.rebuilt_tables),
            ("backfilled", result.backfilled_tables),
        ):
            for item in items:
                print(f"  {label}: {item}")
    return 0


def _d1(args: argparse.Namespace, settings: config.D1Settings | None = None) -> D1Client:
    """The D1 client of the chosen target: its database, with its shards (`targets.open_shards`)."""
    return open_shards((settings or config.d1_settings()).client(), getattr(args, "shards_json", None))


@contextmanager
def _clients(args: argparse.Namespace) -> Iterator[tuple[PgmqClient, D1Client]]:
    """Both clients from the environment, closed afterwards. The queue must exist (`require_queue`): a
    command run before setup, or with a mistyped `D1SYNC_QUEUE`, says so and how to fix it (exit 2)."""
    d1_settings = config.d1_settings()
    with PgmqClient(embedded.source_url(), queue=args.queue) as pg:
        pg.require_queue()
        d1 = _d1(args, d1_settings)
        try:
            yield pg, d1
        finally:
            d1.close()


def _not_drained(report: ApplyReport) -> str:
    """Why an apply ended with changes still in the queue."""
    if report.caught_up:
        return "applied the backlog it found; the changes committed while it ran wait for the next run"
    return "budget reached; the queue is not empty"


def _cmd_apply(args: argparse.Namespace) -> int:
    schema = _schema(args)
    options = ApplyOptions(
        batch_size=args.batch_size,
        vt_seconds=args.vt,
        max_messages=args.max_messages,
        max_seconds=args.max_seconds,
        planner_process=config.planner_process(),
    )
    with _clients(args) as (pg, d1):
        ensure_schema(pg, d1, schema)
        bar = Progress("applied messages", pg.metrics().queue_length)
        options = replace(options, on_batch=lambda r: bar.update(r.messages))
        report = apply(pg, d1, schema, options)
        bar.close()
    if args.json:
        print(json.dumps(report.to_json(), default=str))
    elif report.skipped:
        print(f"apply skipped: {report.skipped}")
    else:
        for name, t in report.tables.items():
            if t.messages or t.released:
                print(
                    f"{name}: {t.messages} messages, {t.upserts} upserts, {t.deletes} deletes, "
                    f"{t.dead_lettered} dead-lettered, {t.rows_written} rows written, lag {t.lag_seconds or 0:.1f}s"
                    + (f", {t.held} held" if t.held else "")
                    + (f", {t.released} held changes applied" if t.released else "")
                )
        for found in report.drift.values():
            for d in found:
                print(f"schema drift: {d}")
        print(
            f"applied {report.messages} messages in {report.duration_seconds:.2f}s "
            f"({report.changes_per_second:,.0f}/s), {report.requests} D1 requests, "
            f"{report.rows_per_request:,.0f} rows/request, {report.dead_lettered} dead-lettered"
            + ("" if report.drained else f" ({_not_drained(report)})")
        )
        if config.d1_settings().backend == "local" and report.rows_written:
            print("(local D1 file: rows written counts table rows only; D1 also bills every index entry written)")
    if report.skipped:
        return 1
    return 0 if report.dead_lettered == 0 and report.held == 0 else 1


def _cmd_status(args: argparse.Namespace) -> int:
    schema = _schema(args)
    with _clients(args) as (pg, d1):
        st = status(pg, d1, schema)
        problems = capture_findings(pg, schema)
    failing = [f for f in problems if f.level == "fail"]
    if args.json:
        print(json.dumps(st.to_json() | {"problems": [asdict(f) for f in problems]}))
        return 1 if failing else 0
    age = "-" if st.oldest_message_age_seconds is None else f"{st.oldest_message_age_seconds}s"
    print(f"PGMQ: {st.pgmq}")
    print(f"queue {st.queue}: {st.queue_depth} messages waiting, oldest {age}, newest msg_id {st.newest_msg_id}")
    print(f"last applied: {st.last_applied_at or 'never'} (msg_id {st.last_applied_msg_id or '-'})")
    where = f"{st.position} at {st.position_at}" if st.position else "none yet"
    print(f"position (D1 holds every transaction this snapshot sees): {where}")
    same = "current" if st.schema_version_applied == st.schema_version_current else "OUT OF DATE: run d1sync setup"
    print(f"schema version in D1: {st.schema_version_applied or 'none'} ({same})")
    print(f"D1 reads: {st.d1_reads}")
    if sys.stdout.isatty():
        names = list(st.dead_letters) + [t for t in st.held if t not in st.dead_letters]
        rows = [(t, f"{st.dead_letters.get(t, 0):,}", f"{st.held.get(t, 0):,}") for t in names]
        print_table(("table", "dead letters", f"held in {st.queue}_held"), rows)
    else:
        for table, n in st.dead_letters.items():
            print(f"  {table}: {n} dead letters")
        for table, n in st.held.items():
            print(f"  {table}: {n} changes held in {st.queue}_held (its source drifted from schema.json)")
    if st.last_nuke:
        n = st.last_nuke
        print(
            f"last nuke: {n.get('at')} of {', '.join(n.get('tables') or [])} by {n.get('launched_by')} "
            f"from {n.get('source')}; restore point {n.get('restore_point')}"
        )
    if st.last_restore:
        r = st.last_restore
        print(f"last restore: {r.get('at')} to {r.get('bookmark')} by {r.get('launched_by')} from {r.get('source')}")
    if problems and sys.stdout.isatty():
        print_table(("", "check", "problem", "fix"), [(f.level.upper(), f.check, f.detail, f.fix) for f in problems])
    else:
        for f in problems:
            print(f"{f.level.upper()}: {f.check}: {f.detail}; fix: {f.fix}")
    return 1 if failing else 0


def _row_estimates(pg: PgmqClient, schema: Schema, tables: list[str] | None) -> dict[str, int | None]:
    """Postgres' row estimates (pg_class.reltuples) for the progress ETA; None where never analyzed."""
    out: dict[str, int | None] = {}
    for t in schema.tables:
        if not tables or t.name in tables:
            rel = f"{ident(t.spec.source_schema)}.{ident(t.name)}"
            n = pg.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", [rel])
            out[t.name] = int(n[0][0]) if n and n[0][0] and n[0][0] > 0 else None
    return out


class _TableBars:
    """One `Progress` per table, created on its first update."""

    def __init__(self, what: str, estimates: dict[str, int | None]) -> None:
        self.what, self.estimates, self.bars = what, estimates, {}

    def update(self, table: str, done: int) -> None:
        if table not in self.bars:
            self.bars[table] = Progress(f"{self.what} {table} rows", self.estimates.get(table))
        self.bars[table].update(done)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _cmd_backfill(args: argparse.Namespace) -> int:
    schema = _schema(args)
    tables = list(args.table or [])

    with _clients(args) as (pg, d1):
        # Estimates before the backfill's threads use the connection.
        bars = _TableBars("backfill", _row_estimates(pg, schema, tables))
        report = backfill(
            pg,
            d1,
            schema,
            tables=tables or None,
            chunk_size=args.chunk_size,
            restart=args.restart,
            on_chunk=lambda table, t: bars.update(table, t.rows),
            shard=args.shard,
        )
        bars.close()
    if args.json:
        print(json.dumps(report.to_json(), default=str))
    else:
        for name, t in report.tables.items():
            resumed = f" (resumed after key {t.resumed_from})" if t.resumed_from else ""
            print(f"{name}: {t.rows:,} rows in {t.chunks} chunks, {t.rows_per_second:,.0f} rows/s{resumed}")
        a = report.apply
        if a is not None:
            state = "queue drained" if a.drained else f"queue not drained ({a.skipped or _not_drained(a)})"
            print(f"applied {a.messages} messages, {a.requests} D1 requests, {a.dead_lettered} dead-lettered; {state}")
    return 0 if report.apply is None or report.apply.dead_lettered == 0 else 1


def _cmd_nuke(args: argparse.Namespace) -> int:
    schema = _schema(args)
    if not args.all and not args.table:
        raise ConfigError("say what to nuke: --all, or --table T (repeatable)")
    if args.all and args.table:
        raise ConfigError("--all and --table exclude each other")
    tables = None if args.all else list(args.table)
    if tables:
        for t in tables:
            schema.table(t)  # an unknown table is an error before anything is dropped
    with _clients(args) as (pg, d1):
        report = nuke(
            pg,
            d1,
            schema,
            tables=tables,
            purge_queue=args.purge_queue,
            confirm=args.yes,
            launched_by=_os_user(),
            source="cli",
            accept_no_restore_point=args.no_restore_point,
        )
    purged = f", purged {report.purged_messages} queued changes and {report.purged_dead_letters} dead letters"
    print(f"D1 restore point taken before the nuke: {report.bookmark}")
    print(f"nuked and recreated {', '.join(report.tables)}" + (purged if args.purge_queue else ""))
    print("run `d1sync backfill` to fill the tables again")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    schema = _schema(args)
    with _clients(args) as (pg, d1):
        report = restore(pg, d1, schema, bookmark=args.bookmark, confirm=args.yes, launched_by=_os_user(), source="cli")
        print(f"restored D1 to {report.bookmark}; to undo: d1sync restore --bookmark {report.undo_bookmark} --yes")
        for name, t in report.reconcile.tables.items():
            print(f"{name}: {t.total} rows differed from Postgres after the restore, {t.repaired} repair messages")
        after = reconcile(pg, d1, schema)
    print("D1 equals Postgres, row for row" if after.in_sync else "D1 still differs from Postgres: run d1sync verify")
    return 0 if after.in_sync else 1


def _cmd_teardown(args: argparse.Namespace) -> int:
    schema = _schema(args)
    if not args.yes:
        print(
            f"teardown removes the capture of queue {args.queue} from {len(schema.tables)} tables: their changes "
            "stop reaching this D1 (other queues' capture stays as it is). Run again with --yes.",
            file=sys.stderr,
        )
        return 2
    with PgmqClient(embedded.source_url(), queue=args.queue) as pg:
        removed = teardown_postgres(pg, schema, drop_queue=args.drop_queue)
    dropped = f"; queues {args.queue} and {dlq_name(args.queue)} dropped" if args.drop_queue else ""
    print(f"capture of queue {args.queue} removed from {', '.join(removed) or 'no table'}{dropped}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    schema = _schema(args)
    dx = diagnose(
        lambda: PgmqClient(embedded.source_url(), queue=args.queue),
        lambda: _d1(args),
        schema,
        lag_threshold_seconds=config.number("D1SYNC_LAG_THRESHOLD_SECONDS", 300),
    )
    if args.json:
        print(json.dumps(dx.to_json()))
    elif sys.stdout.isatty():
        rows = [(f.level.upper(), f.check, f.detail, f.fix if f.level != "ok" else "") for f in dx.findings]
        print_table(("", "check", "finding", "fix"), rows)
    else:
        print(dx.table())
    return dx.exit_code


def _os_user() -> str:
    """Who runs this command, for the record a destructive command leaves."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME (some containers)
        return "unknown"


def _cmd_verify(args: argparse.Namespace) -> int:
    schema = _schema(args)
    tables = list(args.table) if args.table else None
    with _clients(args) as (pg, d1):
        bars = _TableBars("verify", _row_estimates(pg, schema, tables))
        report = reconcile(
            pg,
            d1,
            schema,
            tables=tables,
            chunk_size=args.chunk_size,
            repair_drift=args.repair,
            on_chunk=bars.update,
            shard=args.shard,
        )
        bars.close()
    if args.json:
        print(json.dumps(report.to_json(), default=str))
    else:
        for name, t in report.tables.items():
            state = (
                "in sync"
                if t.in_sync
                else "NOT COMPARED"
                if t.problems
                else f"DRIFT: {len(t.missing)} missing, {len(t.extra)} extra, {len(t.different)} different"
                + (f", {len(t.unconvertible)} not convertible" if t.unconvertible else "")
            )
            fixed = f" (repair enqueued {t.repaired} messages and applied them)" if t.repaired else ""
            print(f"{name}: {t.source_rows:,} rows in Postgres, {t.d1_rows:,} in D1, {state}{fixed}")
            for shard, part in t.shards.items():
                said = (
                    "in sync"
                    if part.total == 0
                    else (f"{len(part.missing)} missing, {len(part.extra)} extra, {len(part.different)} different")
                )
                print(f"  shard {shard}: {part.source_rows:,} rows belong here, {part.d1_rows:,} in D1, {said}")
            for label, keys in (("missing", t.missing), ("extra", t.extra), ("different", t.different)):
                if keys:
                    shown = ", ".join(str(list(k)) for k in keys[:10]) + (" ..." if len(keys) > 10 else "")
                    print(f"  {label} keys: {shown}")
            for problem in t.problems:
                print(f"  not compared: {problem}")
            for key, why in list(t.unconvertible.items())[:10]:
                print(f"  key {list(key)} does not convert: {why}")
            if len(t.unconvertible) > 10:
                print(f"  ... {len(t.unconvertible) - 10} more rows that do not convert")
        print(f"{report.d1_rows_read:,} D1 rows read in {report.seconds:.1f}s")
    return 0 if report.in_sync else 1


def _cmd_applied(args: argparse.Namespace) -> int:
    """Whether a source transaction's effects are in D1 (exit 0) or not yet (exit 1), waiting up to --wait."""
    with closing(_d1(args)) as d1:
        if args.shard:
            if not isinstance(d1, ShardedD1) or args.shard not in d1.shards:
                raise ConfigError(f"no shard {args.shard!r} in this target")
            d1 = d1.shards[args.shard]
        arrived = wait_for_applied(d1, args.xid, timeout_seconds=args.wait)
        fresh = freshness(d1)
    if args.json:
        print(json.dumps({"xid": args.xid, "applied": arrived} | asdict(fresh)))
    else:
        state = "in D1" if arrived else "not in D1 yet"
        age = "-" if fresh.age_seconds is None else f"{fresh.age_seconds:.1f}s"
        print(f"transaction {args.xid}: {state} (position {fresh.position or 'none yet'}, recorded {age} ago)")
    return 0 if arrived else 1


def _cmd_shards(args: argparse.Namespace) -> int:
    data = json.loads(getattr(args, "shards_json", None) or '{"shards": {}, "shardBy": {}}')
    rules = data["shardBy"]
    if args.table is not None and args.table not in rules:
        raise ConfigError(f"table {args.table} is not sharded (sharded: {', '.join(rules) or 'none'})")
    if args.value is not None:
        if args.table is None:
            raise ConfigError("--value needs --table")
        rule = rules[args.table]
        kind = _schema(args).table(args.table).columns[rule["column"]]
        value: Any = args.value
        if kind in ("INTEGER", "BOOLEAN"):
            try:
                value = int(args.value)
            except ValueError:
                raise ConfigError(f"{rule['column']} is {kind}: {args.value!r} is not an integer") from None
        shard = shard_for(rule, value)
        print(json.dumps({"table": args.table, "value": value, "shard": shard}) if args.json else shard)
        return 0
    shown = {t: r for t, r in rules.items() if args.table in (None, t)}
    if args.json:
        print(json.dumps({"shards": sorted(data["shards"]), "shardBy": shown}))
    elif not shown:
        print("no sharded tables")
    for table, rule in shown.items() if not args.json else ():
        how = f"hash over {', '.join(rule['hash'])}" if rule.get("hash") else f"default {rule.get('default')}"
        mapped = f", {len(rule['map'])} mapped values" if rule.get("map") else ""
        print(f"{table}: by {rule['column']}, {how}{mapped}")
    return 0


def _cmd_init_schema(args: argparse.Namespace) -> int:
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    with PgmqClient(embedded.source_url(), queue=args.queue) as pg:
        result = introspect(pg, tables=tables, schema_name=args.schema_name)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if not result.schema:
        raise SchemaError("no table could be described (see the notes above)")
    text = json.dumps(result.schema, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}: {len(result.schema)} tables; next: d1sync generate-sql, d1sync setup")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    schema = _schema(args)
    with _clients(args) as (pg, d1):
        example_writes(pg, rows=args.rows)
        report = apply(pg, d1, schema)
        drift = {t.name: diff(pg_rows(pg, t), d1_rows(d1, t)).total for t in schema.tables}
    for name, t in report.tables.items():
        counts = f"{t.upserts} upserts, {t.deletes} deletes"
        print(f"{name}: {t.messages} changes applied ({counts}), {t.rows_written} D1 rows written")
    ok = all(n == 0 for n in drift.values())
    print("D1 equals Postgres, row for row" if ok else f"D1 differs from Postgres: {drift}")
    return 0 if ok and report.dead_lettered == 0 else 1


def _cmd_dev(args: argparse.Namespace) -> int:
    from d1sync_dagster.dev import DevOptions, run_dev

    return run_dev(
        DevOptions(
            schema_file=args.schema,
            queue=args.queue,
            host=args.host,
            port=args.port,
            writes=args.writes,
            rows_per_tick=args.rows,
            tick_seconds=args.every,
            stop_after_seconds=args.stop_after,
            instance_postgres=args.instance_postgres,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d1sync", description="Keep Cloudflare D1 in step with Postgres via PGMQ.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--schema", default=config.schema_path(), help="path of schema.json (env D1SYNC_SCHEMA)")
        p.add_argument("--queue", default=config.queue_name(), help="PGMQ queue name (env D1SYNC_QUEUE)")
        p.add_argument(
            "--target",
            default=None,
            help="the target of targets.json (env D1SYNC_TARGETS) to work on: its queue, tables and D1",
        )

    p = sub.add_parser("generate-sql", help="print the Postgres capture migration (or the D1 DDL)")
    common(p)
    p.add_argument("--sql", choices=["postgres", "d1"], default="postgres", help="which side (default postgres)")
    p.set_defaults(func=_cmd_generate_sql)

    p = sub.add_parser("setup", help="create queue and triggers in Postgres, tables and indexes in D1 (idempotent)")
    common(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--install-pgmq",
        action="store_true",
        help="where the database has no PGMQ and the extension is not available, install the PGMQ SQL bundled "
        "with d1sync",
    )
    p.add_argument(
        "--create-example-tables",
        action="store_true",
        help="first create the Postgres tables of the example schema.json if missing (demo and first run)",
    )
    p.set_defaults(func=_cmd_setup)
    p = sub.add_parser("apply", help="drain the queue into D1 once (exit 0 when drained without dead letters)")
    common(p)
    p.add_argument("--json", action="store_true", help="print per-table figures as JSON")
    p.add_argument("--batch-size", type=int, default=2000, help="messages read per batch (default 2000)")
    p.add_argument("--vt", type=int, default=120, help="ignored: apply no longer sets visibility timeouts")
    p.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("backfill", help="copy existing rows into D1 through the queue (resumable)")
    common(p)
    p.add_argument("--table", action="append", help="table to backfill (repeatable; default all)")
    p.add_argument("--chunk-size", type=int, default=5000, help="rows per chunk (default 5000)")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming an unfinished backfill")
    p.add_argument("--shard", help="only this shard of the sharded tables (targets.json shards)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_backfill)

    p = sub.add_parser("nuke", help="drop and recreate D1 tables from schema.json (needs --yes)")
    common(p)
    p.add_argument("--all", action="store_true", help="every table in schema.json")
    p.add_argument("--table", action="append", help="one table (repeatable)")
    p.add_argument("--purge-queue", action="store_true", help="also drop their queued changes and dead letters")
    p.add_argument("--yes", action="store_true", help="confirm: the tables' contents in D1 are lost")
    p.add_argument(
        "--no-restore-point",
        action="store_true",
        help="go ahead even when no restore point (D1 Time Travel bookmark) can be taken first",
    )
    p.set_defaults(func=_cmd_nuke)

    p = sub.add_parser(
        "teardown", help="remove this queue's capture triggers from the tables (other queues' stay; needs --yes)"
    )
    common(p)
    p.add_argument("--drop-queue", action="store_true", help="also drop the queue and its dead-letter queue")
    p.add_argument("--yes", action="store_true", help="confirm: changes stop being captured for this queue")
    p.set_defaults(func=_cmd_teardown)

    p = sub.add_parser("doctor", help="check both sides and say how to fix each problem (exit 0, 1, or 3)")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("restore", help="put D1 back to a restore point, then repair it from Postgres (needs --yes)")
    common(p)
    p.add_argument("--bookmark", required=True, help="the restore point (a nuke prints the one it took)")
    p.add_argument("--yes", action="store_true", help="confirm: D1 is replaced by its earlier state")
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("verify", help="compare D1 with Postgres row by row (exit 1 on drift)")
    common(p)
    p.add_argument("--table", action="append", help="table to verify (repeatable; default all)")
    p.add_argument("--repair", action="store_true", help="re-enqueue the differing keys and apply them")
    p.add_argument("--chunk-size", type=int, default=5000, help="rows per D1 read (default 5000)")
    p.add_argument("--shard", help="only this shard of the sharded tables (default: every shard)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("applied", help="whether a Postgres transaction id's effects are in D1 (exit 0) or not (1)")
    common(p)
    p.add_argument("xid", type=int, help="the transaction id the write path got (pg_current_xact_id())")
    p.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for it")
    p.add_argument("--shard", help="a sharded target: the shard database that holds the rows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_applied)

    p = sub.add_parser("shards", help="the shard rules of the target (for readers), or the shard of one value")
    common(p)
    p.add_argument("--table", help="a sharded table")
    p.add_argument("--value", help="with --table: the shard column's value (as D1 holds it) to route")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("init-schema", help="write a schema.json from a live Postgres database")
    p.add_argument("--tables", help="comma-separated table names (default: every table of the schema)")
    p.add_argument("--schema-name", default="public", help="Postgres schema to read (default public)")
    p.add_argument("--output", default="-", help="file to write (default: standard output)")
    p.add_argument("--queue", default=config.queue_name(), help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_init_schema)

    p = sub.add_parser("demo", help="write example rows into the example tables, apply, compare D1 with Postgres")
    common(p)
    p.add_argument("--rows", type=int, default=100, help="apps to insert (default 100)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "dev", help="set up, start the Dagster UI and daemon, and (embedded defaults) write live example rows"
    )
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address of the Dagster UI (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="port of the Dagster UI (default 3000)")
    p.add_argument(
        "--writes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate live writes into the example tables (default: only on the embedded Postgres)",
    )
    p.add_argument("--rows", type=int, default=20, help="new apps per write tick (default 20)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between write ticks (default 2)")
    p.add_argument("--stop-after", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument(
        "--instance-postgres",
        action="store_true",
        help="keep Dagster's instance in Postgres (database d1sync_dagster_instance on the source's server, run "
        "monitoring on), as a production deployment does (docs/deploy.md), instead of SQLite files",
    )
    p.set_defaults(func=_cmd_dev)

    p = sub.add_parser("status", help="queue depth, oldest message, dead letters per table, last apply")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    return parser


def _schema(args: argparse.Namespace) -> Schema:
    """schema.json, or the part of it the chosen target replicates."""
    schema = load_schema(args.schema)
    tables = getattr(args, "target_tables", None)
    return schema if tables is None else Schema(tables=tuple(t for t in schema.tables if t.name in tables))


#: Commands that, with several targets and no --target, run for each target in turn.
_PER_TARGET = ("status", "doctor")


def _choose_target(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Point `args` (queue, tables) and this process's D1 variables at `--target`; with several targets and
    no --target, run status or doctor for each (returns the worst exit code), else refuse to guess."""
    if not hasattr(args, "target"):
        return None
    if args.command == "generate-sql" and args.target in ("postgres", "d1"):  # its old spelling of --sql
        args.sql, args.target = args.target, None
    path = targets_path()
    if path is None:
        if args.target not in (None, "default"):
            raise ConfigError(f"--target {args.target}: no targets file is configured (set D1SYNC_TARGETS)")
        return None
    targets = load_targets(load_schema(args.schema), path)
    if args.target is None and len(targets) > 1 and args.command in _PER_TARGET:
        return _for_each_target(args, argv, targets)
    target = pick(targets, args.target)
    args.queue, args.target_tables = target.queue, target.tables
    args.shards_json = target.shards_json()
    env = target.environment()
    for k in (*config.CLOUDFLARE_VARS, "D1_LOCAL_PATH"):
        os.environ.pop(k, None)
    os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
    return None


def _for_each_target(args: argparse.Namespace, argv: Sequence[str], targets: list[Target]) -> int:
    """status or doctor for every target, then the total; with --json one object {targets, total}."""
    codes, outputs = [], {}
    for t in targets:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes.append(main([*argv, "--target", t.label]))
        outputs[t.label] = out.getvalue()
        if not args.json:
            print(f"== target {t.label} (queue {t.queue})")
            print(out.getvalue(), end="")
    worst = max(codes)
    parsed = {name: json.loads(text) for name, text in outputs.items() if args.json and text.strip()}
    total = {"exit_code": worst, "targets": len(targets), "failing": sum(c != 0 for c in codes)}
    if parsed and args.command == "status":
        total |= {
            "queue_depth": sum(p.get("queue_depth") or 0 for p in parsed.values()),
            "dead_letters": sum(sum((p.get("dead_letters") or {}).values()) for p in parsed.values()),
        }
    if args.json:
        print(json.dumps({"targets": parsed, "total": total}))
    else:
        state = "all well" if worst == 0 else f"{total['failing']} of {len(targets)} with problems"
        print(f"== {len(targets)} targets: {state} (exit code {worst})")
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        done = _choose_target(args, argv)
        if done is not None:
            return done
        return int(args.func(args))
    except (SchemaError, ConfigError) as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 2
    except (QueueError, D1Error) as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 3
    except D1SyncError as e:
        print(f"d1sync: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
