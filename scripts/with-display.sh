#!/usr/bin/env bash
# Run a command with an X display: the user's own if there is one, else a virtual one (Xvfb),
# because napari needs an OpenGL context that offscreen Qt cannot give.
set -euo pipefail
if [ -n "${DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
  exec "$@"
fi
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$@"
