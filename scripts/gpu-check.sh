#!/usr/bin/env bash
# One prepared check on a GPU machine, at most 9 minutes: rebuild the
# extension for this Python, the GPU-relevant tests (the Triton kernels, the
# engines under the CUDA sanitizer, the training loop on CUDA), the
# benchmarks in quick mode, one summary.
#
#     bash scripts/gpu-check.sh [OUTDIR]        # default bench/results/gpu-check-<device>-<date>/
#     bash scripts/gpu-check.sh --rehearse OUTDIR   # the same on CPU, CUDA stood in for
#     bash scripts/gpu-check.sh --plan OUTDIR       # the rehearsal's short form (CI): plan,
#                                                   # test selection, refusals; runs no test
#
# A rehearsal runs the real stage plan here with torch reporting CUDA present
# with one device (scripts/rehearse/) and Triton kernels interpreted: tests
# that need the real GPU skip, and what fails is what the GPU machine's
# software would fail on too. Its summary shows each stage's time against its
# limit. scripts/stack-check.sh rehearses in a copy of the GPU machine's
# software (Python 3.12, torch 2.11, triton 3.6).
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

case "${1:-}" in
    --rehearse|--plan)
        if [ $# -ne 2 ]; then
            echo "usage: bash scripts/gpu-check.sh $1 OUTDIR" >&2
            exit 2
        fi
        exec "$PY" "$here/gpu_check.py" "${1#--}" "$2" ;;
esac

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
