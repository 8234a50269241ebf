#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite on CPU (Triton
# kernels through the interpreter) or, where there is one, on the GPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SAMPA_REQUIRE_EXT=${SAMPA_REQUIRE_EXT:-1} exec "${PYTHON:-python3}" -m pytest tests -q "$@"
