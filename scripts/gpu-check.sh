#!/usr/bin/env bash
# One prepared check on a GPU machine, at most 9 minutes: rebuild the
# extension for this Python, run every test (the engine tests under the CUDA
# sanitizer), run the benchmarks in quick mode, print one summary.
#
#     bash scripts/gpu-check.sh [OUTDIR]     # default bench/results/gpu-check-<device>-<date>/
#
# Exit status: 0 all stages and tests passed; 1 something failed (the summary
# says what; benchmark targets missed do not count); 2 no CUDA device here.
# Stages, timeouts and the summary: scripts/gpu_check.py (`python
# scripts/gpu_check.py stages` lists them). A device machine returns at most
# 8 files, so from there write OUTDIR outside $OUT and bring back a tarball:
#     bash scripts/gpu-check.sh /tmp/gc; tar czf $OUT/gpu-check.tgz -C /tmp gc; cp /tmp/gc/summary.json $OUT/
set -uo pipefail
PY=${PYTHON:-python3}
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}     # the 9 minutes count from here
here=$(cd "$(dirname "$0")" && pwd)

# Without a usable GPU nothing below means anything. The probe has its own
# timeout: a CUDA initialisation that hangs is no usable GPU either.
probe='import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"'
out=$(timeout -k 5 60 "$PY" -c "$probe" 2>&1)
rc=$?
if [ $rc -ne 0 ]; then
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        why="the CUDA probe did not finish in 60 s"
    else
        why=$(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -n 1)
    fi
    echo "gpu-check: no CUDA device usable from $PY (${why:-exit status $rc}); nothing was run" >&2
    exit 2
fi
exec "$PY" "$here/gpu_check.py" run "$@"
