#!/usr/bin/env bash
# Creates the side environment for the benchmark's peer libraries (today: SparseProp) and installs them there,
# never into .venv. Idempotent: a stamp keyed on this file, the torch version and the CPU model makes a second
# run take well under a second.
#
#   bash scripts/peers/setup_peers.sh            # -> .peers-venv (override: PEERS_VENV=/some/path)
#
# Environment: PEERS_VENV (venv path), PYTHON (interpreter that creates it, default python3),
# TORCH_VERSION (default: the version in .venv, else 2.14.1), PEERS_LOG (pip log, default $PEERS_VENV.log).
#
# SparseProp ships only an sdist whose setup.py shells out to `pip install pybind11` and `python3 -m pybind11`
# and compiles its AVX2/OpenMP kernels with -march=native: it is built here without build isolation, with the
# venv first on PATH, and without pip's wheel cache (a wheel tuned to this CPU must not be reused on another).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-$PWD/.peers-venv}
LOG=${PEERS_LOG:-$VENV.log}
SPARSEPROP_VERSION=0.1.14
if [[ -z "${TORCH_VERSION:-}" ]]; then
  TORCH_VERSION=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' \
    2>/dev/null || echo 2.14.1)
fi
CPU=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true)

STAMP="$VENV/.peers-install"
KEY=$( (cat "$0"; echo "torch=$TORCH_VERSION sparseprop=$SPARSEPROP_VERSION cpu=$CPU") | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
  exit 0
fi

mkdir -p "$(dirname "$LOG")"
: > "$LOG"
echo "[peers] installing torch $TORCH_VERSION and sparseprop $SPARSEPROP_VERSION into $VENV (full log: $LOG)"

step() {
  local name=$1 started=$SECONDS
  shift
  printf '[peers] %-46s' "$name"
  echo "==== $name: $*" >>"$LOG"
  if "$@" >>"$LOG" 2>&1; then
    echo "ok ($((SECONDS - started)) s)"
  else
    echo "FAILED"
    echo "---- last 40 lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    echo "---- full log: $LOG ----" >&2
    echo "[peers] could not install the peers into $VENV; the benchmark can run without them" >&2
    exit 1
  fi
}

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then step "virtual environment" "$PYTHON" -m venv "$VENV"; fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# SparseProp's setup.py calls `pip` and `python3` by name: they must be the venv's.
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
step "pip, wheel, setuptools" $PIP install --upgrade pip wheel setuptools
step "torch $TORCH_VERSION" $PIP install "torch==$TORCH_VERSION"
step "build requirements (pybind11, numpy, scipy)" $PIP install "pybind11>=2.10" numpy scipy
command -v "${CXX:-g++}" >/dev/null 2>&1 || { echo "[peers] no C++ compiler (g++): sparseprop compiles from source" >&2; exit 1; }
step "sparseprop $SPARSEPROP_VERSION (compiles, -march=native)" \
  $PIP install -v --no-build-isolation --no-cache-dir --no-deps --force-reinstall "sparseprop==$SPARSEPROP_VERSION"
step "import check (forward + backward vs dense)" "$VENV/bin/python" - <<'PY'
import torch
from sparseprop.modules import SparseLinear

torch.manual_seed(0)
dense = torch.nn.Linear(64, 32)
with torch.no_grad():
    dense.weight.mul_((torch.rand_like(dense.weight) > 0.9).float())
sparse = SparseLinear.from_dense(dense)
x = torch.randn(16, 64)
ref, out = dense(x), sparse(x)
ref.square().sum().backward()
out.square().sum().backward()
mask = dense.weight != 0
assert torch.allclose(ref, out, atol=1e-4), "forward differs from dense"
assert torch.allclose(dense.weight.grad[mask], sparse.W_val.grad, atol=1e-3), "weight gradient differs from dense"
print("sparseprop ok:", sparse)
PY
echo "$KEY" > "$STAMP"
echo "[peers] done"
