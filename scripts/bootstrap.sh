#!/usr/bin/env bash
# Prepare a fresh checkout: a virtualenv with d1sync and its test tools, and the D1 stand-in's npm packages.
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.d1sync-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi
# Test-side npm packages: the D1 HTTP API stand-in (miniflare + Node 22) and playwright-core for UI screenshots.
if [ ! -x d1stub/node_modules/.bin/node ] || [ ! -d d1stub/node_modules/miniflare ] || [ ! -d d1stub/node_modules/playwright-core ]; then
  command -v npm >/dev/null || { echo "bootstrap: npm is needed for the D1 stand-in (apt-get install npm)" >&2; exit 1; }
  (cd d1stub && npm ci --no-audit --no-fund --loglevel=error)
fi
