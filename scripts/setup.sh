#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (root, package registries only).
# Usage: bash scripts/setup.sh [install|main|test] [args...]
#   main: install, then the main job; test: install, then ruff and pytest.
# Each step checks first, so a second run costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv

need_apt=()
for pkg in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt: installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Stamp keyed by the dependency list so edits to pyproject.toml re-trigger the install.
stamp="$VENV/.fastres-installed"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VPY" -c "import torch, torchvision, ffcv, fastres" >/dev/null 2>&1; then
  echo "[setup] pip: torch, torchvision, ffcv, fastres (first time takes a few minutes)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VPY" -m pip install -q ffcv==1.0.2
  "$VPY" -m pip install -q -e ".[dev,cluster]"
  echo "$want" > "$stamp"
fi

# What to run once everything is in place.
mode=${1:-install}
shift || true
case "$mode" in
  install) ;;
  main) exec "$VPY" -m fastres.grid "$@" ;;
  test)
    # Debian's chromium renders the HTML report in its browser test; only tests need it.
    if ! dpkg -s chromium >/dev/null 2>&1; then
      echo "[setup] apt: installing chromium (for the HTML report's browser test)"
      SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
    fi
    "$VENV/bin/ruff" check .
    exec "$VPY" -m pytest "$@" ;;
  *) echo "usage: bash scripts/setup.sh [install|main|test] [args...]" >&2; exit 2 ;;
esac
