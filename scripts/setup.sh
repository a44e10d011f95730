#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the toolkit into it.
#
#   bash scripts/setup.sh          # idempotent: re-installs only when pyproject/constraints change
#
# torch is pinned (constraints.txt) to the CPU build; torchvision is never installed (it breaks
# transformers on these machines, see ../shared/STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SEED_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi

# pip, quietly; on failure show its output (minus this machine's harmless index-location notices).
pipq() {
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2; rm -f "$log"
    echo "[setup] pip $* failed" >&2; exit 1
  fi
  rm -f "$log"
}

stamp="$VENV/.seed-setup-stamp"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import seedtok, torch" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
else
  echo "[setup] installing torch (CPU build) and the toolkit into $VENV"
  pipq install -q --upgrade pip
  # torch first, pinned, so that no dependency can pull a CUDA build.
  pipq install -q -c constraints.txt torch
  pipq install -q -c constraints.txt -e ".[dev]"
  "$VENV/bin/python" -c "import seedtok, torch, transformers" \
    || { echo "[setup] installation failed" >&2; exit 1; }
  if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "[setup] torchvision is installed in $VENV and breaks transformers here; removing it" >&2
    "$VENV/bin/python" -m pip uninstall -y -q torchvision
  fi
  echo "$want" > "$stamp"
fi
