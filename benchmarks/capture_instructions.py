"""Capture cost as CPU instructions per row: exact and repeatable where wall-clock time is not.

    .venv/bin/python benchmarks/capture_instructions.py [--before FILE ...] [--all-replicated]
        [--shape bulk|single|update|delete ...]

`trigger_overhead.py` times the capture; on this shared 2-core machine its runs move by 5% and more, as much as
the changes to compare. This script counts instead: it makes a throwaway cluster (initdb), one database per
variant (no capture; today's; each `--before` migration; set up by `trigger_overhead.reset`), and runs the
same statements as `trigger_overhead.py` (one bulk INSERT; single-row INSERTs in a server-side loop), and one
UPDATE of every row, single-row UPDATEs (in the same loop) and one DELETE of every row (the rows written
before with capture off), in Postgres's single-user mode under
`valgrind --tool=callgrind`, twice: with `--low` and with `--high` rows. The difference over the
extra rows is the instructions one row costs, without start-up, planning or the function's first compile.
Each variant's capture cost is its count less the plain insert's. Needs valgrind and Postgres's server
binaries (`pg_config --bindir`, else /usr/lib/postgresql/*/bin); run as root, the cluster is the `postgres`
user's. Instructions are not time (cache misses, WAL writes and fsyncs are not in them), but a change that
does less work shows here at once and the same way every run.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.trigger_overhead import BEFORE, INSERT, SETTINGS, SINGLE, reset  # noqa: E402
from d1sync_dagster.embedded import pgmq_sql  # noqa: E402
from d1sync_dagster.schema import load_schema  # noqa: E402
from d1sync_dagster.sql.capture import migration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: What every run ends with, so the next run of the same database starts from the same state (triggers off).
RESET = (
    "SET session_replication_role = replica;\n\nTRUNCATE public.apps;\n\nSELECT pgmq.purge_queue('replicate_data');\n\n"
)


def bindir() -> Path:
    if shutil.which("pg_config"):
        found = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
        if (found / "initdb").exists():
            return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        sys.exit("capture_instructions: no initdb found (install Postgres's server binaries)")
    return Path(candidates[-1]).parent


def as_owner(cmd: list[str]) -> list[str]:
    """Postgres refuses to run as root: run its binaries as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: What each shape measures, by name.
SHAPES = {
    "bulk": "one bulk INSERT into apps",
    "single": "single-row INSERTs into apps",
    "update": "one UPDATE of every row of apps",
    "single-update": "single-row UPDATEs of apps",
    "delete": "one DELETE of every row of apps",
}


def statement(shape: str, rows: int) -> str:
    insert = INSERT.replace("%s", str(rows)).replace("%%", "%").strip() + ";\n\n"
    if shape == "bulk":
        return insert
    if shape == "single":
        return SINGLE.replace("%s", str(rows)).replace("%%", "%").strip() + ";\n\n"
    # The rows are written first with capture off (the same for every variant, so it cancels out).
    seeded = f"SET session_replication_role = replica;\n\n{insert}SET session_replication_role = origin;\n\n"
    if shape == "update":
        return seeded + "UPDATE public.apps SET name = name || '!', rating = rating + 1;\n\n"
    if shape == "single-update":
        loop = SINGLE.replace("%s", str(rows)).replace("%%", "%").strip()
        start, end = loop.index("    INSERT"), loop.index("  END LOOP")
        update = "    UPDATE public.apps SET name = name || '!', rating = rating + 1 WHERE id = g;\n"
        return seeded + loop[:start] + update + loop[end:] + ";\n\n"
    return seeded + "DELETE FROM public.apps;\n\n"


def instructions(bin_: Path, data: Path, db: str, script: str) -> int:
    run = subprocess.run(
        as_owner(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                str(bin_ / "postgres"),
                "--single",
                "-D",
                str(data),
                "-j",
                db,
            ]
        ),
        input=script,
        capture_output=True,
        text=True,
        check=True,
    )
    if "ERROR:" in run.stdout or "ERROR:" in run.stderr:
        sys.exit(f"capture_instructions: {db}: {(run.stdout + run.stderr)[-2000:]}")
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        sys.exit(f"capture_instructions: no instruction count from valgrind: {run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", type=Path, action="append", default=[], help="a saved capture migration (repeatable)")
    ap.add_argument("--all-replicated", action="store_true", help="drop apps.secret_note: every column replicated")
    ap.add_argument("--shape", choices=list(SHAPES), action="append", help="what to measure (repeatable; all)")
    ap.add_argument("--low", type=int, default=1000)
    ap.add_argument("--high", type=int, default=4000)
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("capture_instructions: needs valgrind (apt-get install valgrind)")
    bin_ = bindir()
    SETTINGS["all_replicated"] = args.all_replicated
    BEFORE.update({p.stem: p.read_text(encoding="utf-8") for p in args.before})
    variants = ["plain", "d1sync", *BEFORE]
    queue_setup = migration(load_schema(ROOT / "schema.json")).split("-- apps ->")[0]
    work = Path(tempfile.mkdtemp(prefix="d1sync-instructions-"))
    try:
        os.chmod(work, 0o777)  # the postgres user writes its cluster and socket here
        data = work / "data"
        subprocess.run(
            as_owner([str(bin_ / "initdb"), "-D", str(data), "-A", "trust"]), check=True, capture_output=True
        )
        port = free_port()
        options = f"-p {port} -k {work} -c listen_addresses=''"
        log = str(work / "server.log")  # with -l, the server does not hold this process's pipes open
        start = [str(bin_ / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start"]
        subprocess.run(as_owner(start), check=True, stdout=subprocess.DEVNULL)
        try:
            url = f"host={work} port={port} user=postgres"
            for i, variant in enumerate(variants):
                with psycopg.connect(f"{url} dbname=postgres", autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE v{i}")
                with psycopg.connect(f"{url} dbname=v{i}", autocommit=True) as conn:
                    conn.execute(pgmq_sql().encode())
                    conn.execute(queue_setup.encode())
                    reset(conn, variant)
                    conn.execute("VACUUM ANALYZE")
        finally:
            subprocess.run(
                as_owner([str(bin_ / "pg_ctl"), "-D", str(data), "-w", "stop"]), check=True, capture_output=True
            )
        columns = "every column replicated" if args.all_replicated else "one column not replicated"
        for shape in args.shape or list(SHAPES):
            per_row = {}
            for i, name in enumerate(variants):
                low, high = (
                    instructions(bin_, data, f"v{i}", statement(shape, n) + RESET) for n in (args.low, args.high)
                )
                per_row[name] = (high - low) / (args.high - args.low)
            print(f"{SHAPES[shape]} ({columns}): instructions per row, rows {args.low:,} to {args.high:,}")
            plain = per_row["plain"]
            for name, n in per_row.items():
                line = f"  {name:28s} {n:10,.0f}"
                if name != "plain":
                    line += f"   capture {n - plain:9,.0f}"
                    if name == "d1sync":
                        line += "".join(f"   {(n - plain) / (per_row[b] - plain) - 1:+.1%} vs {b}" for b in BEFORE)
                print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
