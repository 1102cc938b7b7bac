#!/usr/bin/env bash
# The main command: prepares the checkout if needed, then runs replication once end to end. With no
# DATABASE_URL it uses the embedded defaults: an embedded Postgres in .d1sync/postgres with the example
# tables and some example writes, and D1 as the local file .d1sync/local.sqlite. With DATABASE_URL (and
# optionally CLOUDFLARE_*) it sets up capture and drains the queue of that database into that D1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -z "${DATABASE_URL:-}" ]; then
  .venv/bin/d1sync setup --create-example-tables
  .venv/bin/d1sync demo "$@"
else
  .venv/bin/d1sync setup
  .venv/bin/d1sync apply "$@"
fi
.venv/bin/d1sync status
