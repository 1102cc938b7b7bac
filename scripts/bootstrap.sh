#!/usr/bin/env bash
# Prepare a fresh checkout. `bootstrap.sh`: a virtualenv with d1sync and what it needs to run (Python only,
# no npm). `bootstrap.sh --test`: also the test tools (pytest, hypothesis, ruff) and the D1 stand-in's npm
# packages (miniflare, playwright-core). Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
with_tests=false
[ "${1:-}" = "--test" ] && with_tests=true
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
install() {  # install() <stamp> <pip target>: once, and again whenever pyproject.toml changes
  if [ ! -f "$1" ] || [ pyproject.toml -nt "$1" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$2"
    touch "$1"
  fi
}
install .venv/.d1sync-installed .
$with_tests || exit 0
install .venv/.d1sync-test-installed '.[test]'
# Test-side npm packages: the D1 HTTP API stand-in (miniflare + Node 22) and playwright-core for UI screenshots.
if [ ! -x d1stub/node_modules/.bin/node ] || [ ! -d d1stub/node_modules/miniflare ] || [ ! -d d1stub/node_modules/playwright-core ]; then
  command -v npm >/dev/null || { echo "bootstrap: the tests need npm for the D1 stand-in (apt-get install npm)" >&2; exit 1; }
  (cd d1stub && npm ci --no-audit --no-fund --loglevel=error)
fi
