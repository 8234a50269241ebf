#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite on CPU (Triton
# kernels through the interpreter) or, where there is one, on the GPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
if "$PY" -m ruff --version >/dev/null 2>&1; then
    "$PY" -m ruff check .              # lint: pyproject.toml's [tool.ruff]
else
    echo "ruff is not installed here: lint skipped"
fi
SAMPA_REQUIRE_EXT=${SAMPA_REQUIRE_EXT:-1} exec "$PY" -m pytest tests -q "$@"
