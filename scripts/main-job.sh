#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on scikit-learn's digits with
# 40% label noise, 1 thread per process unless a method says otherwise:
#   SGD; SAM in 1 process; SAM in 1 process on 2 threads (@2t); SAM
#   data-parallel on 2 processes (@2p); SAMPa-0 and SAMPa-0.2 on 2 processes,
#   their two gradients at the same time (ranks launched here, gloo on 127.0.0.1).
# Prints the results table; writes runs/digits/results.json and the plots
# (--overwrite: replacing an earlier run's).
# Extra arguments go to `python -m sampa_fused.train compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m sampa_fused.train compare --label-noise 0.4 --rho 0.3 --epochs 60 \
    --methods sgd,sam,sam@2t,sam@2p,sampa-0@2p,sampa-0.2@2p --seeds 0 --threads 1 --out runs/digits --overwrite "$@"
