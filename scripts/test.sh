#!/usr/bin/env bash
# The test command: prepares the checkout if needed, then runs the whole suite against real Postgres + PGMQ
# and the real D1 engine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
.venv/bin/ruff check d1sync_dagster tests benchmarks
exec .venv/bin/python -m pytest "$@"
