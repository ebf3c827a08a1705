#!/usr/bin/env bash
# The main job, from a fresh machine: set up, then run the whole pipeline on the embedded demo
# plate (generate -> embed with EfficientNet-Lite0 -> ICFL on control-whitened tokens -> concept
# report against the ground truth) and open the result in napari. Every step is cached in
# out/demo, so a second run only redraws. With no display it renders under Xvfb and saves
# out/demo.png instead of waiting for a user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV="${VENV:-.venv}"
args=(out/demo)
if [ -z "${DISPLAY:-}" ] && [ "$(uname)" != "Darwin" ]; then
  args+=(--screenshot out/demo.png)
fi
exec bash scripts/with-display.sh "$VENV/bin/plate-concepts" demo-run "${args[@]}" "$@"
