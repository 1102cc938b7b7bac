"""`d1sync doctor`: check both sides of the replication and say how to fix each problem found.

Postgres: reachable, how it is reached, the role, PGMQ, the queue and the dead-letter queue and this role's
rights on them, vacuum rights, and per table of `schema.json`: the source relation, the role's right to read
it (row level security included), the four capture triggers installed, enabled, writing to this queue, and
their function able to write into it. D1: reachable, token accepted, the schema version. Then what is
waiting: dead letters and the oldest queued change.

Each finding is `ok`, `warn` (works, but worth knowing) or `fail` (replication is broken or will break).
The exit code: 0 when nothing failed, 1 when something did, 3 when a side could not be reached at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from d1sync_dagster.clients.d1 import D1Client, HttpD1Client
from d1sync_dagster.clients.d1_shards import all_databases
from d1sync_dagster.clients.pgmq import PgmqClient, describe_holders
from d1sync_dagster.engine.catalog import check_reads_every_row
from d1sync_dagster.engine.costs import INCLUDED_PER_MONTH, daily_reads
from d1sync_dagster.engine.drift import check as check_drift
from d1sync_dagster.engine.status import d1_meta
from d1sync_dagster.errors import D1Error, QueueError
from d1sync_dagster.schema import Schema, Table
from d1sync_dagster.sql.capture import (
    COLUMNS_IN_PLACE,
    FUNCTION_SCHEMA,
    function_name,
    named_form_table,
    source_relation,
    trigger_names,
)
from d1sync_dagster.sql.quoting import ident

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    fix: str = ""


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def add(self, check: str, level: Level, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(check, level, detail, fix))

    @property
    def exit_code(self) -> int:
        if self.unreachable:
            return 3
        return 1 if any(f.level == "fail" for f in self.findings) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "unreachable": self.unreachable,
            "findings": [asdict(f) for f in self.findings],
        }

    def table(self) -> str:
        """The findings as a plain-text table, one line each, with the fix under a problem."""
        width = max([len(f.check) for f in self.findings] + [5])
        lines = []
        for f in self.findings:
            lines.append(f"{f.level.upper():4}  {f.check:<{width}}  {f.detail}")
            if f.fix and f.level != "ok":
                lines.append(f"{'':4}  {'':<{width}}  fix: {f.fix}")
        return "\n".join(lines)


def diagnose(
    connect_pg: Callable[[], PgmqClient],
    connect_d1: Callable[[], D1Client],
    schema: Schema,
    *,
    lag_threshold_seconds: float = 300.0,
) -> Diagnosis:
    """Every check of both sides; a side that cannot be reached is reported, the other is still checked."""
    dx = Diagnosis()
    try:
        pg: PgmqClient | None = connect_pg()
    except QueueError as e:
        dx.add("postgres", "fail", str(e), "check DATABASE_URL and that the database accepts connections")
        dx.unreachable.append("postgres")
        pg = None
    if pg is not None:
        with pg:
            _postgres(dx, pg, schema, lag_threshold_seconds)
            _reads(dx, pg, schema)
    try:
        d1 = connect_d1()
    except D1Error as e:
        dx.add("d1", "fail", str(e), "set CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_D1_DATABASE_ID, CLOUDFLARE_API_TOKEN")
        return dx
    try:
        for shard, database in all_databases(d1):
            _d1(dx, database, schema, "" if shard is None else f" (shard {shard})")
    finally:
        d1.close()
    return dx


def _reads(dx: Diagnosis, pg: PgmqClient, schema: Schema) -> None:
    """What d1sync reads from D1 a day (D1 bills every row read): past the plan's included reads, say so."""
    reads = daily_reads(pg, schema)
    if reads.per_month_at_most > INCLUDED_PER_MONTH:
        fix = (
            "run the reconcile less often (D1SYNC_RECONCILE_CRON, e.g. weekly) or record less often "
            "(the stream's record_every_seconds)"
        )
        dx.add("d1 reads", "warn", reads.describe(), fix)
    else:
        dx.add("d1 reads", "ok", reads.describe())


def _consumer_lock(dx: Diagnosis, pg: PgmqClient) -> None:
    """Whether this connection can hold the single-consumer lock (a pooler in statement mode cannot), and
    who holds it now."""
    via = "Supabase's transaction pooler (port 6543)" if pg.pooled else "a direct connection or a pooler"
    try:
        with pg.consumer_lock() as got:
            pass
    except QueueError as e:
        dx.add("consumer lock", "fail", str(e), "connect directly or through a pooler in session or transaction mode")
        return
    if got:
        dx.add("consumer lock", "ok", f"free, and it can be held through {via}")
        return
    holders = describe_holders(pg.lock_holders()) or "another consumer"
    dx.add("consumer lock", "ok", f"held by {holders}, through {via}")


def _postgres(dx: Diagnosis, pg: PgmqClient, schema: Schema, lag_threshold: float) -> None:
    role, db, version, superuser, bypass = pg.execute(
        "SELECT current_user, current_database(), current_setting('server_version'), r.rolsuper, r.rolbypassrls "
        "FROM pg_roles r WHERE r.rolname = current_user"
    )[0]
    dx.add("postgres", "ok", f"connected to {db} as {role}, PostgreSQL {version}")
    _consumer_lock(dx, pg)
    dx.add("role", "ok", f"{role}" + (", superuser" if superuser else "") + (", bypasses RLS" if bypass else ""))
    install = pg.pgmq_install()
    if install == "missing":
        dx.add(
            "pgmq",
            "fail",
            "PGMQ is not installed in this database",
            "CREATE EXTENSION pgmq (Supabase: Database → Extensions → pgmq), then d1sync setup; where no pgmq "
            "extension is available, d1sync setup --install-pgmq installs the PGMQ SQL bundled with d1sync",
        )
        return
    dx.add("pgmq", "ok", f"PGMQ {install}")
    usable: dict[str, bool] = {}  # queue -> exists and this role may use it (asked once per queue)
    present: set[str] = set()
    for queue, what in ((pg.queue, "queue"), (pg.dlq, "dead-letter queue")):
        usable[queue] = False
        if pg.queue_exists(queue):
            present.add(queue)
        else:
            dx.add(what, "fail", f"the {what} {queue} does not exist", "d1sync setup (or run supabase_migration.sql)")
            continue
        missing = pg.missing_queue_rights(queue)
        usable[queue] = not missing
        if missing:
            dx.add(
                what,
                "fail",
                f"{role} lacks {', '.join(missing)}",
                f"as the queue's owner: GRANT USAGE ON SCHEMA pgmq TO {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON "
                f"ALL TABLES IN SCHEMA pgmq TO {role}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {role}",
            )
        else:
            dx.add(what, "ok", f"{queue} exists and {role} may read, write and delete in it")
    if pg.queue not in present:
        return
    owner, may_vacuum = pg.queue_owner()
    if may_vacuum:
        dx.add("vacuum", "ok", f"{role} owns the queue table (owner {owner}) and vacuums it after a drain")
    else:
        dx.add(
            "vacuum",
            "warn",
            f"the queue table is owned by {owner}, so only autovacuum cleans it",
            f"make {role} the owner of the queue table of {pg.queue}, or tune autovacuum for it",
        )
    for table in schema.tables:
        _capture(dx, pg, table)
    _drift(dx, pg, schema)
    if usable[pg.queue]:  # what is waiting can only be read with the rights on the queue
        _waiting(dx, pg, lag_threshold, read_dead_letters=usable[pg.dlq])


def _capture(dx: Diagnosis, pg: PgmqClient, table: Table) -> None:
    rel = source_relation(table)
    read, check = f"read {table.name}", f"capture {table.name}"
    if not pg.execute("SELECT to_regclass(%s) IS NOT NULL", [rel])[0][0]:
        dx.add(read, "fail", f"{rel} does not exist", "create it, or remove it from schema.json")
        return
    if not pg.execute("SELECT has_table_privilege(%s, 'SELECT')", [rel])[0][0]:
        dx.add(read, "fail", f"this role cannot read {rel}", f"GRANT SELECT ON {rel} TO the role d1sync connects as")
    else:
        try:
            check_reads_every_row(pg, table, doing="read")
            dx.add(read, "ok", f"{rel}: this role reads every row")
        except QueueError as e:
            dx.add(read, "fail", str(e), "BYPASSRLS for the role, the table's owner, or a FOR SELECT policy")
    fn_name = function_name(table, pg.queue)
    function = f"{ident(FUNCTION_SCHEMA)}.{ident(fn_name)}"
    found = {name: rest for name, *rest in pg.capture_triggers(rel, FUNCTION_SCHEMA, fn_name)}
    names = list(trigger_names(pg.queue).values())
    missing = [t for t in names if t not in found]
    if missing:
        dx.add(check, "fail", f"capture triggers missing on {rel}: {', '.join(missing)}", "d1sync setup")
        return
    disabled = [t for t in names if not found[t][0]]
    if disabled:
        dx.add(
            check,
            "fail",
            f"capture triggers disabled on {rel}: {', '.join(disabled)} (changes are silently lost)",
            "; ".join(f"ALTER TABLE {rel} ENABLE TRIGGER {t}" for t in disabled) + "; then d1sync verify --repair",
        )
        return
    if not all(ours for _, ours, _ in found.values()):
        dx.add(
            check,
            "fail",
            f"the capture function of {rel} writes to another queue than {pg.queue}",
            f"d1sync setup --queue {pg.queue} (another deployment may own these triggers)",
        )
        return
    if not all(can for _, _, can in found.values()):
        dx.add(
            check,
            "fail",
            f"the owner of {function} may not insert into the queue: every write to {rel} fails",
            "as the queue table's owner: GRANT INSERT ON the queue table TO the function's owner (or rerun "
            "d1sync setup as the role that owns the queue)",
        )
        return
    body = pg.function_source(FUNCTION_SCHEMA, fn_name) or ""
    target = named_form_table(body)
    if target is not None:
        # Through the catalog: this role may lack USAGE on the schema (to_regprocedure would then fail).
        found = pg.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname = 'columns_in_place' "
            "AND p.proargtypes = '25 26 1009'::oidvector)",  # (text, oid, text[])
            [FUNCTION_SCHEMA],
        )[0][0]
        if not found:
            dx.add(check, "fail", f"{COLUMNS_IN_PLACE} is missing: every write to {rel} fails", "d1sync setup")
            return
        if target != pg.execute("SELECT to_regclass(%s)::oid", [rel])[0][0]:
            dx.add(
                check,
                "warn",
                f"the capture function of {rel} was set up for a table of another oid (restored from a dump?): "
                "it sends each change without naming the columns, which costs more per row",
                "d1sync setup",
            )
            return
    dx.add(check, "ok", f"{rel}: four capture triggers enabled, writing to {pg.queue}")


def _waiting(dx: Diagnosis, pg: PgmqClient, lag_threshold: float, *, read_dead_letters: bool) -> None:
    letters = pg.dead_letters_by_table() if read_dead_letters else {}
    if letters:
        total = sum(letters.values())
        dx.add(
            "dead letters",
            "fail",
            f"{total} changes could not apply: " + ", ".join(f"{t} {n}" for t, n in sorted(letters.items())),
            f"read them with SELECT message FROM pgmq.read('{pg.dlq}', 0, 100); fix the cause, then "
            "d1sync verify --repair",
        )
    else:
        dx.add("dead letters", "ok", "none")
    m = pg.metrics()
    age = m.oldest_msg_age_sec
    if age is not None and age > lag_threshold:
        dx.add(
            "oldest change",
            "warn",
            f"{m.queue_length} changes waiting, the oldest {age} s old",
            "check that the sensor or `d1sync apply` runs",
        )
    else:
        dx.add(
            "oldest change", "ok", f"{m.queue_length} changes waiting" + (f", the oldest {age} s old" if age else "")
        )


def _d1(dx: Diagnosis, d1: D1Client, schema: Schema, shard: str = "") -> None:
    """One D1 database (`shard`: which shard, in the findings' names)."""
    try:
        meta = d1_meta(d1)
    except D1Error as e:
        if e.kind == "unreachable":
            dx.add("d1" + shard, "fail", str(e), "check CLOUDFLARE_API_BASE_URL and the network")
            if "d1" not in dx.unreachable:
                dx.unreachable.append("d1")
        elif e.kind in ("auth", "not_found"):
            fix = "a token with D1 Edit on this account, and the right account and database ids"
            dx.add("d1" + shard, "fail", str(e), fix)
        else:
            dx.add("d1" + shard, "fail", str(e), "try again; D1 reported a temporary failure")
        return
    opened = "reachable, token accepted" if isinstance(d1, HttpD1Client) else "the local D1 file opens"
    dx.add("d1" + shard, "ok", opened)
    applied = meta.get("schema_version")
    if applied == schema.version:
        dx.add("schema version" + shard, "ok", f"D1 has schema.json version {applied}")
    else:
        dx.add(
            "schema version" + shard,
            "fail",
            f"D1 has version {applied or 'none'}, schema.json is {schema.version}",
            "d1sync setup (apply runs do it too)",
        )
    _publication(dx, meta, shard)


def _publication(dx: Diagnosis, meta: dict[str, str], shard: str) -> None:
    """Whole transactions: the position D1 recorded, and any transaction too large for one request."""
    position = meta.get("position")
    where = f"{position} at {meta.get('position_at')}" if position else "none yet (before the first apply)"
    split = meta.get("last_split_transactions")
    if split:
        dx.add(
            "transactions" + shard,
            "warn",
            f"transactions larger than one D1 request were published in parts on a sharded target, so readers could "
            f"see them in part ({split}); every other transaction is published whole. Position: {where}",
            "keep source transactions on sharded tables under 50 MB of changes (ApplyOptions.transaction_bytes), "
            "or split them in Postgres",
        )
    else:
        dx.add(
            "transactions" + shard,
            "ok",
            f"every source transaction is published whole (in one request up to 50 MB of statements, staged "
            f"beyond); position: {where}",
        )


def capture_findings(pg: PgmqClient, schema: Schema) -> list[Finding]:
    """The per-table read and capture checks alone (what `d1sync status` shows): a broken capture path
    loses changes silently, so it must never look like "0 messages waiting"."""
    dx = Diagnosis()
    for table in schema.tables:
        _capture(dx, pg, table)
    _drift(dx, pg, schema)
    return [f for f in dx.findings if f.level != "ok"]


def _drift(dx: Diagnosis, pg: PgmqClient, schema: Schema) -> None:
    """Each column of schema.json the source no longer has as it was (`core/drift.py`), with its fix, and the
    changes held meanwhile. Capture itself keeps working through any DDL; what breaks is applying."""
    found = check_drift(pg, schema)
    try:
        held = pg.held_by_table() if pg.has_pgmq() else {}
    except QueueError:  # no rights on the queues: their own findings say so
        held = {}
    for table in schema.tables:
        for d in found.get(table.name, []):
            dx.add(f"schema {table.name}.{d.column}", "fail" if d.holds else "warn", f"{d.column} {d.detail}", d.fix)
        if not found.get(table.name):
            dx.add(f"schema {table.name}", "ok", "the source has every column of schema.json, in types it takes")
    for name, n in sorted(held.items()):
        if not any(d.holds for d in found.get(name, [])):
            dx.add(
                f"held {name}",
                "warn",
                f"{n} change(s) of {name} wait in {pg.held} from a drift that is over",
                "the next apply applies them first (d1sync apply, or the running stream's next run)",
            )
        else:
            dx.add(f"held {name}", "fail", f"{n} change(s) of {name} wait in {pg.held} until schema.json follows")
