"""Trigger overhead: plain insert vs d1sync's statement-level capture (default: one INSERT into the queue
table; and the `send_batch` variant) vs the seed's per-row trigger calling `pgmq.send`, for one bulk INSERT of
`--rows` rows and for as many single-row INSERTs (one statement each, in a server-side loop, so client round
trips do not hide the trigger's cost).

    .venv/bin/python benchmarks/trigger_overhead.py [--rows 100000] [--repeat 3] [--before FILE ...]
        [--only-before] [--all-replicated]

`--before FILE` adds a variant installed from a saved capture migration (e.g. `d1sync generate-sql` of an
earlier commit), measured interleaved with the others, so a change to capture is compared in one run; give it
more than once to compare several (each is named by its file's stem).
`--all-replicated` drops `apps.secret_note` first (the one column schema.json leaves out), so every column
of the table is replicated: the capture then puts each row into its message as it is, with nothing to take
out. `--only-before` leaves out the `send_batch` and per-row variants. For figures that do not move between
runs, count instructions instead (`capture_instructions.py`).
Prints the median time of each variant and the ratios; docs/benchmarks.md quotes one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fresh_database  # noqa: E402
from d1sync_dagster.schema import load_schema  # noqa: E402
from d1sync_dagster.sql.capture import example_source_tables, migration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SEED_PER_ROW = """
CREATE OR REPLACE FUNCTION public.seed_per_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pgmq.send('replicate_data', jsonb_build_object(
    'record', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END,
    'old_record', CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
    'type', TG_OP, 'table', TG_TABLE_NAME));
  RETURN NULL;
END $$;
CREATE TRIGGER seed_per_row AFTER INSERT OR UPDATE OR DELETE ON public.apps
  FOR EACH ROW EXECUTE FUNCTION public.seed_per_row();
"""

INSERT = """
INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, created_at)
SELECT g, gen_random_uuid(), 'app ' || g, g %% 2 = 0, jsonb_build_object('n', g, 'tags', jsonb_build_array('a', 'b')),
       g / 7.0, now()
FROM generate_series(1, %s) g
"""


SINGLE = """
DO $$
BEGIN
  FOR g IN 1..%s LOOP
    INSERT INTO public.apps (id, owner_id, name, is_public, settings, rating, created_at)
    VALUES (g, gen_random_uuid(), 'app ' || g, g %% 2 = 0,
            jsonb_build_object('n', g, 'tags', jsonb_build_array('a', 'b')), g / 7.0, now());
  END LOOP;
END $$
"""

#: Saved migrations to compare against (`--before`), by variant name, and whether apps keeps its column
#: that is not replicated (`--all-replicated`).
BEFORE: dict[str, str] = {}
SETTINGS = {"all_replicated": False}


def reset(conn: psycopg.Connection, variant: str) -> None:
    conn.execute("DROP TABLE IF EXISTS public.apps CASCADE; DROP TABLE IF EXISTS public.app_versions CASCADE")
    conn.execute(example_source_tables().encode())
    if SETTINGS["all_replicated"]:
        conn.execute("ALTER TABLE public.apps DROP COLUMN secret_note")
    conn.execute("SELECT pgmq.purge_queue('replicate_data')")
    if variant == "d1sync":
        conn.execute(migration(load_schema(ROOT / "schema.json")).encode())
    elif variant == "send_batch":
        conn.execute(migration(load_schema(ROOT / "schema.json"), via="send_batch").encode())
    elif variant in BEFORE:
        conn.execute(BEFORE[variant].encode())
    elif variant == "per-row":
        conn.execute(SEED_PER_ROW.encode())
    conn.execute("CHECKPOINT")


def measure(url: str, variant: str, rows: int, shape: str) -> tuple[float, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        reset(conn, variant)
        started = time.perf_counter()
        if shape == "bulk":
            conn.execute(INSERT, [rows])
        else:
            conn.execute(SINGLE.replace("%s", str(int(rows))).replace("%%", "%"))
        elapsed = time.perf_counter() - started
        queued = conn.execute("SELECT count(*) FROM pgmq.q_replicate_data").fetchone()[0]
    return elapsed, queued


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="a saved capture migration to measure beside today's (repeatable)",
    )
    ap.add_argument("--shape", choices=["bulk", "single", "both"], default="both")
    ap.add_argument("--only-before", action="store_true", help="measure plain, d1sync and --before only")
    ap.add_argument("--all-replicated", action="store_true", help="drop apps.secret_note: every column replicated")
    args = ap.parse_args()
    SETTINGS["all_replicated"] = args.all_replicated
    variants = ["plain", "d1sync"] if args.only_before else ["plain", "d1sync", "send_batch", "per-row"]
    for i, path in enumerate(args.before):
        name = f"{path.stem}" if len(args.before) > 1 else "before"
        BEFORE[name] = path.read_text(encoding="utf-8")
        variants.insert(2 + i, name)
    shapes = ["bulk", "single"] if args.shape == "both" else [args.shape]
    with fresh_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(migration(load_schema(ROOT / "schema.json")).split("-- apps ->")[0].encode())
            version = conn.execute("SELECT current_setting('server_version')").fetchone()[0]
        times = {(s, v): [] for s in shapes for v in variants}
        for i in range(args.repeat):
            # Interleaved, so drift on the machine hits every variant alike, and in an order that turns each
            # repeat: the variant run right after `plain` was measured 10% slower than the same code later.
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for shape, variant in ((s, v) for s in shapes for v in order):
                elapsed, queued = measure(url, variant, args.rows, shape)
                expected = 0 if variant == "plain" else args.rows
                assert queued == expected, f"{variant}: {queued} messages queued, expected {expected}"
                times[(shape, variant)].append(elapsed)
    for shape in shapes:
        med = {v: statistics.median(times[(shape, v)]) for v in variants}
        what = "one bulk INSERT of" if shape == "bulk" else "single-row INSERTs,"
        columns = "every column replicated" if args.all_replicated else "one column not replicated"
        print(f"{what} {args.rows:,} rows into apps ({columns}), PostgreSQL {version}, median of {args.repeat}")
        for k, v in med.items():
            print(f"  {k:22s} {v:7.3f} s   {args.rows / v:>10,.0f} rows/s   {v / med['plain']:.2f}x plain")
        extra = {k: med[k] - med["plain"] for k in med}
        if "per-row" in med:
            print(f"  d1sync is {med['per-row'] / med['d1sync']:.2f}x faster than the per-row design in total time")
        print("  time the capture adds: " + ", ".join(f"{k} {extra[k]:.3f} s" for k in variants if k != "plain"))


if __name__ == "__main__":
    main()
