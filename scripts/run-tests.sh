#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set up, then pytest under a (virtual) display.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV="${VENV:-.venv}"
exec bash scripts/with-display.sh "$VENV/bin/python" -m pytest "$@"
