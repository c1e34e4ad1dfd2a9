#!/usr/bin/env bash
# Creates .venv and installs everything sparseapps needs. Idempotent: a stamp keyed on this file, the
# dependency spec and the NVIDIA-driver probe makes a second run take about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

# fbgemm-gpu needs libnvidia-ml.so.1 at import time; without a driver the CPU build is the one that loads.
if ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml.so.1'; then FBGEMM=fbgemm-gpu==1.9.0; else FBGEMM=fbgemm-gpu-cpu==1.9.0; fi

STAMP="$VENV/.sparseapps-install"
KEY=$( (cat scripts/install.sh pyproject.toml requirements/*.txt sparseapps/core/kernels/csrc/* sparseapps/core/kernels/build.py; echo "$FBGEMM") | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
  exit 0
fi

LOG=${INSTALL_LOG:-$PWD/.install.log}
: > "$LOG"
echo "[install] creating $VENV and installing dependencies (first run takes a few minutes; full log: $LOG)"

# step NAME COMMAND...: one line per step; the command's output goes to the log, whose tail is shown on failure.
step() {
  local name=$1 started=$SECONDS
  shift
  printf '[install] %-52s' "$name"
  echo "==== $name: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    echo "ok ($((SECONDS - started)) s)"
  else
    echo "FAILED"
    echo "---- last 40 lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    echo "---- full log: $LOG ----" >&2
    exit 1
  fi
}

if [[ ! -x "$VENV/bin/python" ]]; then step "virtual environment $VENV" "$PYTHON" -m venv "$VENV"; fi
step "pip, wheel, setuptools" $PIP install --upgrade pip wheel setuptools
# torch first, pinned: PyPI's torchvision only imports beside the matching torch build.
step "torch 2.14.1, torchvision 0.29.1" $PIP install -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1
# torchrec's declared dependency is the CUDA fbgemm-gpu; install the build that loads here, then torchrec alone.
step "$FBGEMM" $PIP install -c requirements/constraints.txt "$FBGEMM"
step "torchrec 1.9.2 (no deps)" $PIP install -c requirements/constraints.txt --no-deps torchrec==1.9.2
# MovieLens-100K ships inside the recbole wheel; its data only, none of its dependencies.
step "recbole 1.2.1 (MovieLens-100K files only)" $PIP install --no-deps recbole==1.2.1
step "runtime and dev requirements" $PIP install -c requirements/constraints.txt -r requirements/runtime.txt -r requirements/dev.txt
step "sparseapps (editable)" $PIP install -c requirements/constraints.txt --no-deps --no-build-isolation -e .

# Build the compiled kernels now, never on first call in a user's loop (a failed build is reported, not fatal).
printf '[install] %-52s' "compiled kernels"
if "$VENV/bin/python" -m sparseapps.core.kernels.build >>"$LOG" 2>&1; then
  echo "ok"
else
  echo "unavailable: the reference path will be used (see 'sparseapps info' and $LOG)"
fi
# Kernel parameters by measurement on this CPU (cached per CPU model; another machine kind re-tunes at first use).
if [ -f sparseapps/core/kernels/_build/sparseapps_kernels.so ]; then
  printf '[install] %-52s' "kernel parameters for this CPU"
  if "$VENV/bin/python" -m sparseapps.core.kernels.tuning >>"$LOG" 2>&1; then
    tail -n 1 "$LOG" | sed 's/^\[tuning\] //'
  else
    echo "defaults kept (see $LOG)"
  fi
fi

echo "$KEY" > "$STAMP"
echo "[install] done"
