#!/usr/bin/env bash
# Set up a fresh machine for sampa-fused: dependencies, then the package with
# its compiled extension. Uses an installed torch where there is one (GPU
# machines); pins the CPU build otherwise (an unpinned torch pulls CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! have torch; then
    "$PY" -m pip install -q torch==2.13.0
fi
missing=()
have triton || missing+=("triton==3.8.0")
for mod_pkg in numpy:numpy pytest:pytest pytest_benchmark:pytest-benchmark tqdm:tqdm \
               matplotlib:matplotlib sklearn:scikit-learn ninja:ninja setuptools:setuptools \
               wheel:wheel; do
    have "${mod_pkg%%:*}" || missing+=("${mod_pkg#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$PY" -m pip install -q "${missing[@]}"
fi
# The package from this checkout, with its extension (a CUDAExtension where torch
# has CUDA and nvcc is found, else C++ only). Reinstalled when `import
# sampa_fused` finds another checkout or the extension is not built.
here=$(pwd -P)/sampa_fused
found=$(cd / && "$PY" -c "import os, sampa_fused; print(os.path.realpath(os.path.dirname(sampa_fused.__file__)))" 2>/dev/null || true)
if [ "$found" != "$here" ] || ! (cd / && "$PY" -c "import torch, sampa_fused._C") >/dev/null 2>&1 \
        || [ "${SAMPA_REBUILD:-0}" = 1 ]; then
    MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
