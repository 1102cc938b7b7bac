#!/usr/bin/env bash
# The main command: prepares the checkout if needed, then sets up replication on the embedded defaults
# (embedded Postgres in .d1sync/postgres with the example tables, D1 as .d1sync/local.sqlite) unless
# DATABASE_URL / CLOUDFLARE_* point elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -z "${DATABASE_URL:-}" ]; then
  .venv/bin/d1sync setup --create-example-tables "$@"
else
  .venv/bin/d1sync setup "$@"
fi
