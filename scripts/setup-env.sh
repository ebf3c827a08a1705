#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine with Python 3.11:
# system libraries for headless Qt/napari (when missing and we may install them), a virtual
# environment, the pinned CPU build of PyTorch (first, so nothing pulls a multi-GB CUDA build),
# then the package with its test extras. Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

SYSTEM_PACKAGES=(xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libxkbcommon-x11-0 libxkbcommon0
  libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1 libdbus-1-3 libfontconfig1)
missing=()
if command -v dpkg >/dev/null 2>&1; then
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  if [ "$SUDO" = "none" ]; then
    echo "setup: missing system packages (${missing[*]}); ask an administrator to apt-get install them" >&2
  else
    echo "setup: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.plate-concepts-installed"
fingerprint="$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The pinned CPU torch first: the package's own torch requirement is a range that it satisfies.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[testing]"
echo "$fingerprint" > "$stamp"
