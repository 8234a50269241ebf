#!/usr/bin/env bash
# Rehearse the GPU check in a copy of the GPU machine's software, on CPU:
# a venv with Python 3.12 (pyenv), torch==2.11.0, triton==3.6.0, numpy<2.4
# and only what that machine has besides (pytest, pytest-benchmark,
# scikit-learn, matplotlib, tqdm, ninja: no ruff, safetensors, lightning,
# accelerate, pytest-xdist or pytest-timeout), the extension built for it as
# the check's build stage does, then `scripts/gpu-check.sh --rehearse` in it.
#
#     bash scripts/stack-check.sh [OUTDIR]      # default /tmp/stack-check-<date>
#
# The venv lives outside the checkout (STACK_VENV, default
# ~/.cache/sampa-fused/stack-venv) and is reused when it has the right
# versions. The registry serves torch 2.11.0 only as its CUDA 13 wheel
# (several GB with its nvidia-* wheels, a few minutes the first time); it
# imports and runs on CPU. Too heavy for every CI run: run it before asking
# for GPU time, and quote its summary.
# Exit status: the rehearsal's (0: no failure and every stage within its limit).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "stack-check: $*" >&2; }

VENV=${STACK_VENV:-$HOME/.cache/sampa-fused/stack-venv}
OUTDIR=${1:-/tmp/stack-check-$(date -u +%Y%m%d-%H%M%S)}
REQS=("torch==2.11.0" "triton==3.6.0" "numpy<2.4" pytest pytest-benchmark scikit-learn matplotlib
      tqdm ninja)
ABSENT=(ruff safetensors lightning accelerate xdist pytest_timeout transformers)   # not on the GPU machine
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
    base=${STACK_PYTHON:-}
    if [ -z "$base" ] && command -v pyenv >/dev/null; then
        ver=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
        [ -n "$ver" ] && base=$(pyenv root)/versions/$ver/bin/python3.12
    fi
    base=${base:-$(command -v python3.12 || true)}
    if [ -z "$base" ] || [ ! -x "$base" ]; then
        say "ERROR: no Python 3.12 found (pyenv install 3.12, or set STACK_PYTHON)"
        exit 1
    fi
    say "creating $VENV with $base"
    mkdir -p "$(dirname "$VENV")"
    "$base" -m venv "$VENV"
fi

# The versions, read from the venv itself: install only when one is off.
have='
import importlib.metadata as md, sys
want = {"torch": "2.11.0", "triton": "3.6.0"}
for mod in ("pytest", "pytest_benchmark", "sklearn", "matplotlib", "tqdm", "ninja"):
    __import__(mod)
import numpy, torch
assert sys.version_info[:2] == (3, 12), sys.version
for pkg, v in want.items():
    got = md.version(pkg)
    assert got.split("+")[0] == v, f"{pkg} {got}, want {v}"
assert tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4), f"numpy {numpy.__version__}"
'
if ! "$PY" -c "$have" >/dev/null 2>&1; then
    say "installing ${REQS[*]} into $VENV (the torch wheel is several GB the first time)"
    "$PY" -m pip install -q --disable-pip-version-check "${REQS[@]}"
    "$PY" -c "$have"
fi
for mod in "${ABSENT[@]}"; do
    if "$PY" -c "import $mod" >/dev/null 2>&1; then
        say "ERROR: $VENV has $mod, which the GPU machine lacks: remove it (pip uninstall) or use a fresh STACK_VENV"
        exit 1
    fi
done
"$PY" - <<'PYEOF' >&2
import sys, torch, triton, numpy
print(f"stack-check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
PYEOF

# The extension for this Python and torch, as the check's build stage builds
# it (CUDA first, C++ only if that fails), timed: a GPU machine pays this
# cold. The rehearsal's own build stage is then a rebuild with nothing to do.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}     # the GPU machine's H100
mkdir -p "$OUTDIR"
t0=$(date +%s)
if SAMPA_FUSED_BUILD=cuda MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace \
        > "$OUTDIR/stack-build.log" 2>&1; then
    built=cuda
else
    say "the CUDA build failed here (tail of $OUTDIR/stack-build.log below); building the C++ part only"
    tail -n 5 "$OUTDIR/stack-build.log" >&2
    SAMPA_FUSED_BUILD=cpu MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace \
        >> "$OUTDIR/stack-build.log" 2>&1
    built=cpu
fi
say "extension built ($built) in $(( $(date +%s) - t0 )) s"

say "rehearsing the GPU check in $OUTDIR"
unset GPU_CHECK_T0
PYTHON=$PY exec bash scripts/gpu-check.sh --rehearse "$OUTDIR"
