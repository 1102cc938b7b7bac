"""Two targets fed from one table: drain one target's backlog alone, then both targets' backlogs at once,
in one run, and report the aggregate changes/s against one target alone.

    .venv/bin/python benchmarks/targets_drain.py [--rows 50000] [--batch-size 5000]

The example `apps` table is written with `rows` inserts and as many updates (in statements of 5,000), which
the capture triggers of both targets (`prod` on queue `replicate_data`, `staging` on `replicate_staging`)
queue into both queues. Each drain runs on an exact copy of that database (CREATE DATABASE ... TEMPLATE) and
fresh copies of the two local D1 files, as `d1sync apply --target T` processes (what a Dagster run of each
target's apply does, one process per run): first `prod` alone, then `prod` and `staging` side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.common import copy_of, fresh_database  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
D1SYNC = [sys.executable, "-m", "d1sync_dagster"]


def _env(url: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "D1_", "D1SYNC_"))}
    return env | {
        "DATABASE_URL": url,
        "D1SYNC_TARGETS": str(work / "targets.json"),
        "D1SYNC_SCHEMA": str(ROOT / "schema.json"),
    }


def _targets(work: Path) -> None:
    (work / "targets.json").write_text(
        json.dumps(
            {
                "prod": {"queue": "replicate_data", "d1": {"localPath": str(work / "prod.sqlite")}},
                "staging": {"queue": "replicate_staging", "d1": {"localPath": str(work / "staging.sqlite")}},
            }
        )
    )


def _drain(url: str, base: Path, work: Path, targets: list[str], batch: int) -> tuple[float, int]:
    """Wall time of draining `targets` side by side, and the messages they applied."""
    work.mkdir()
    _targets(work)
    for name in ("prod", "staging"):
        shutil.copy(base / f"{name}.sqlite", work / f"{name}.sqlite")
    env = _env(url, work)
    started = time.monotonic()
    procs = [
        subprocess.Popen([*D1SYNC, "apply", "--target", t, "--json", "--batch-size", str(batch)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t in targets
    ]  # fmt: skip
    messages = 0
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"apply failed: {err}")
        messages += json.loads(out)["messages"]
    return time.monotonic() - started, messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=5000)
    args = ap.parse_args()
    with fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _targets(base)
        env = _env(url, base)
        for t in ("prod", "staging"):
            subprocess.run([*D1SYNC, "setup", "--target", t, "--create-example-tables"], env=env, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        with psycopg.connect(url, autocommit=True) as conn:
            for lo in range(1, args.rows + 1, 5000):
                hi = min(lo + 4999, args.rows)
                conn.execute(
                    "INSERT INTO apps (id, name, rating) SELECT g, 'n' || g, g / 3.0 "
                    "FROM generate_series(%s::bigint, %s::bigint) g",
                    [lo, hi],
                )
            for lo in range(1, args.rows + 1, 5000):
                conn.execute("UPDATE apps SET rating = rating + 1 WHERE id BETWEEN %s AND %s", [lo, lo + 4999])
            per_queue = conn.execute("SELECT count(*) FROM pgmq.q_replicate_data").fetchone()[0]
        with copy_of(url) as alone_url:
            alone_s, alone_n = _drain(alone_url, base, Path(tmp) / "alone", ["prod"], args.batch_size)
        with copy_of(url) as both_url:
            both_s, both_n = _drain(both_url, base, Path(tmp) / "both", ["prod", "staging"], args.batch_size)
    alone_rate, both_rate = alone_n / alone_s, both_n / both_s
    print(f"two targets fed from apps: {per_queue:,} changes queued for each (batch {args.batch_size})")
    print(f"  prod alone                   {alone_n:,} changes in {alone_s:.2f} s: {alone_rate:,.0f} changes/s")
    print(f"  prod and staging at once     {both_n:,} changes in {both_s:.2f} s: {both_rate:,.0f} changes/s in all")
    print(f"  aggregate against one alone  {both_rate / alone_rate:.2f}x")


if __name__ == "__main__":
    main()
