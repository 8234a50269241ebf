#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job: SGD vs SAM vs SAMPa-0 vs
# SAMPa-0.2 on scikit-learn's digits with 40% label noise (about 2 minutes on
# 2 CPU cores). Prints the results table; writes runs/digits/results.json and
# the plots. Extra arguments go to `python -m sampa_fused.train compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m sampa_fused.train compare --label-noise 0.4 --rho 0.3 --epochs 60 \
    --seeds 0 --threads 1 --out runs/digits "$@"
