#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on scikit-learn's digits with
# 40% label noise.
#
# Without CUDA (1 thread per process unless a method says otherwise):
#   SGD; SAM in 1 process; SAM in 1 process on 2 threads (@2t); SAM
#   data-parallel on 2 processes (@2p); SAMPa-0 and SAMPa-0.2 on 2 processes,
#   their two gradients at the same time (ranks launched here, gloo on 127.0.0.1).
# Prints the results table; writes runs/digits/results.json and the plots
# (--overwrite: replacing an earlier run's). Extra arguments go to
# `python -m sampa_fused.train compare`.
# On a GPU machine: SGD, SAM, SAMPa-0 and SAMPa-0.2 on the GPU, SAM and SAMPa
#   on the streams engine (SAMPa's two gradients on two CUDA streams at once);
#   the @Np CPU ranks are not what a GPU machine is for.
# MAIN_JOB_DRY_RUN=1 prints the command instead of setting up and running it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ "${MAIN_JOB_DRY_RUN:-0}" = 1 ] || bash scripts/setup.sh
common=(--label-noise 0.4 --rho 0.3 --epochs 60 --seeds 0 --out runs/digits --overwrite)
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    cmd=("$PY" -m sampa_fused.train compare "${common[@]}" --device cuda --engine streams
         --methods sgd,sam,sampa-0,sampa-0.2)
else
    cmd=("$PY" -m sampa_fused.train compare "${common[@]}" --device cpu --threads 1
         --methods sgd,sam,sam@2t,sam@2p,sampa-0@2p,sampa-0.2@2p)
fi
if [ "${MAIN_JOB_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}" "$@"
    echo
    exit 0
fi
exec "${cmd[@]}" "$@"
