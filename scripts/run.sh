#!/usr/bin/env bash
# The main command: prepares the checkout if needed, then runs d1sync under Dagster (`d1sync dev`): setup,
# the Dagster UI on http://127.0.0.1:3000 and the daemon, whose sensor keeps a streaming apply run following
# the queue.
# With no DATABASE_URL it uses the embedded defaults: an embedded Postgres in .d1sync/postgres with the
# example tables and a generator of live writes, and D1 as the local file .d1sync/local.sqlite. With
# DATABASE_URL (and optionally CLOUDFLARE_*) it replicates that database into that D1, writing nothing itself.
# Ctrl-C stops everything it started. Arguments go to `d1sync dev` (e.g. --port 3001, --stop-after 120).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh  # Python only: what running needs (no npm, no test tools)
exec .venv/bin/d1sync dev "$@"
