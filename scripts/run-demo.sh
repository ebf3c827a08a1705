#!/usr/bin/env bash
# The main job, from a fresh machine: set up, then open the demo plate in napari with the plugin.
# With no display it runs under Xvfb and saves a screenshot instead of waiting for a user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV="${VENV:-.venv}"
REAL=../shared/data/real/nf1_plate2
args=("$REAL/images" --platemap "$REAL/platemap_NF1_plate2.csv")
if [ -z "${DISPLAY:-}" ] && [ "$(uname)" != "Darwin" ]; then
  mkdir -p out
  args+=(--screenshot out/demo-plate.png)
fi
exec bash scripts/with-display.sh "$VENV/bin/plate-concepts" view "${args[@]}" "$@"
