"""Communication microbenchmark in the manner of nccl-tests, for your cluster.

Same flags, same table and the same bandwidth definitions as NVIDIA's
nccl-tests (doc/PERFORMANCE.md), over torch.distributed (NCCL on GPUs, gloo
on CPUs), plus the exposed communication of a sampa-fused step.

One node:
    torchrun --standalone --nproc-per-node 8 bench/bench_comm.py -b 8 -e 1G -f 2 --ops all
    python bench/bench_comm.py --nproc 2 -b 8 -e 16M -f 2     # spawns the local ranks itself
Several nodes (run on every node):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        --rdzv-id comm bench/bench_comm.py -b 8 -e 8G -f 2 --json comm.json
The engines' exposed communication per step:
    torchrun --standalone --nproc-per-node 2 bench/bench_comm.py --engine-step --ops all_reduce
A short GPU check in one process (peer_copy vs copy on cuda:0, a peer-engine step):
    python bench/bench_comm.py --quick --json out.json

Ops (--ops, comma-separated, or `all`): all_reduce, reduce_scatter,
all_gather, broadcast, reduce, alltoall, sendrecv (a ring: send to rank+1,
receive from rank-1, as nccl-tests), and with CUDA: peer_copy (the
extension's PeerLink copy from this rank's GPU to the next local GPU, the
peer engine's exchange; the same GPU when there is only one) and copy (a
device-to-device cudaMemcpyAsync on this rank's GPU, the reference).

Columns, per size (one table per op): size (B) is the larger of the send and
receive buffers; count the elements per rank given to the call; type; redop
(`none` for ops without a reduction, the -o op for sendrecv, as nccl-tests
prints them); root (-1 where there is none); then for out-of-place and for
in-place: time (us, the mean over -n iterations, ranks combined by -a),
algbw = size / time and busbw = algbw x the op's factor (GB/s, 1e9 B/s), and
#wrong (mismatched elements summed over ranks, N/A without -c). busbw
factors: all_reduce 2(n-1)/n; reduce_scatter, all_gather, alltoall (n-1)/n;
broadcast, reduce, sendrecv, peer_copy, copy 1.

Where torch.distributed differs from NCCL's C API:
- all_reduce, broadcast and reduce exist in place only: their out-of-place
  columns run the same call on a receive buffer separate from the send
  buffer (the check fills it from the send buffer first, untimed), so both
  halves of the row time the same call.
- torch promises nothing for a send and a receive on the same memory (gloo
  really corrupts in-place sendrecv and alltoall here): their in-place
  columns receive into a scratch buffer and copy it over the input, and the
  time includes that copy.
- peer_copy and copy have no in-place variant: N/A.

Timing: per size, -w warm-up calls and one more call followed by a barrier,
then -n calls; NCCL (and the CUDA copies): CUDA events on the stream the
communication is ordered on, one pair around the -n calls; gloo: wall clock
around the -n calls, after a barrier. -a combines the ranks' times as
nccl-tests does: 0 rank 0's, 1 the mean, 2 the min, 3 the max.

Data check (-c N): before the timed loop and for each of N check calls,
every rank fills its input with a deterministic per-rank pattern of small
integers (exact in every type, so sums and products are exact in any order);
after a check call every rank counts the elements of its result that differ
from the expected value (avg on floating types: within rounding), summed over
ranks into #wrong. --corrupt R changes one element of rank R's result before
it is counted: a self-test of the check.

--engine-step: a SAMPa step (SGD) on the distributed engine (an even world
size of 2 or more) and, where this machine has CUDA and the extension's CUDA
part, on the peer engine (rank 0 alone, after the collectives), with the
gradient exchange on and then skipped (opt.engine.exchange = False: the same
compute, wrong results), alternating in rounds; exposed communication =
median step time with the exchange - without it, in ms and as % of the step
with it, and the gradient bytes each rank (device) sends per step.

--json PATH writes the rows, the ranks' hosts and devices, versions and the
engine-step numbers; --plot PATH busbw against size, one line per op.
Exits with status 1 when #wrong > 0 anywhere, as nccl-tests does.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Measure the checkout this file is in, not some other installed copy.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
          "double": torch.float64, "int32": torch.int32, "int64": torch.int64,
          "int8": torch.int8, "uint8": torch.uint8}
REDOPS = {"sum": "SUM", "prod": "PRODUCT", "min": "MIN", "max": "MAX", "avg": "AVG"}
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "alltoall",
               "sendrecv")
CUDA_OPS = ("peer_copy", "copy")
ALL_OPS = COLLECTIVES + CUDA_OPS
REDUCING = ("all_reduce", "reduce_scatter", "reduce")
ROOTED = ("broadcast", "reduce")
# Integers up to these are exact in the type: the patterns' reductions stay below.
EXACT_LIMIT = {torch.float16: 2048, torch.bfloat16: 256, torch.float32: 1 << 24,
               torch.float64: 1 << 53, torch.int8: 127, torch.uint8: 255,
               torch.int32: (1 << 31) - 1, torch.int64: (1 << 63) - 1}
# avg on floating types divides: compare within a few ulps of the type.
AVG_RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6,
            torch.float64: 1e-14}
TARGET_PEER_VS_COPY = 0.90
TARGET_EXPOSED = 0.05
GB = 1e9
ENV_RANK = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ============================================================== flags
def parse_size(text: str) -> int:
    """nccl-tests' sizes: a number of bytes, optionally with K, M or G (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: give a number of bytes, optionally with a K, M or G suffix "
            "(powers of 1024), e.g. 8, 64K, 16M, 1G")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def _int_in(lo: int, hi: Optional[int], what: str):
    def conv(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{what} must be {rng}, got {v}")
        return v
    return conv


def parse_ops(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return ["all"]
    bad = [t for t in names if t not in ALL_OPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(bad) or repr(text)}: choose among {', '.join(ALL_OPS)}, "
            "comma-separated, or `all`")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench_comm.py", description=__doc__.split("\n\n")[0],
        epilog="Run under torchrun (any --nproc-per-node and --nnodes) or alone with --nproc N. "
               "See the module docstring (bench/bench_comm.py) and bench/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # nccl-tests' flags, same letters and meaning (their defaults where not None;
    # None lets --quick fill in its own).
    ap.add_argument("-b", "--minbytes", type=parse_size, default=None,
                    help="smallest size in bytes (K/M/G suffixes; default 32M)")
    ap.add_argument("-e", "--maxbytes", type=parse_size, default=None,
                    help="largest size in bytes (default 32M)")
    ap.add_argument("-f", "--stepfactor", type=_int_in(1, None, "-f/--stepfactor"), default=None,
                    help="multiply the size by this between rows (default 1: disabled, use -i)")
    ap.add_argument("-i", "--stepbytes", type=parse_size, default=None,
                    help="add this many bytes between rows when -f is 1 (default 1M)")
    ap.add_argument("-n", "--iters", type=_int_in(1, None, "-n/--iters"), default=None,
                    help="timed iterations per size and mode (default 20)")
    ap.add_argument("-w", "--warmup_iters", type=_int_in(0, None, "-w/--warmup_iters"),
                    default=None, help="untimed warm-up iterations per size and mode (default 1; "
                    "one more call and a barrier always precede the timed ones)")
    ap.add_argument("-c", "--check", type=_int_in(0, None, "-c/--check"), default=None,
                    help="check the result of this many calls per size and mode (default 1; 0: off)")
    ap.add_argument("-d", "--datatype", choices=list(DTYPES), default="float")
    ap.add_argument("-o", "--op", choices=list(REDOPS), default="sum",
                    help="reduction of all_reduce, reduce_scatter and reduce")
    ap.add_argument("-r", "--root", type=_int_in(0, None, "-r/--root"), default=0,
                    help="root rank of broadcast and reduce")
    ap.add_argument("-a", "--average", type=_int_in(0, 3, "-a/--average"), default=1,
                    help="how the ranks' times combine: 0 rank 0's, 1 mean, 2 min, 3 max")
    ap.add_argument("--ops", type=parse_ops, default=None,
                    help=f"comma-separated among {', '.join(ALL_OPS)}, or `all` "
                    "(default all_reduce)")
    # launch
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="cpu: every rank and the engine step on CPU, as on a machine without "
                    "CUDA (gloo; several local ranks on a one-GPU machine); cuda: refuse to run "
                    "without CUDA; auto (default): cuda where present")
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                    help="nccl (CUDA tensors) or gloo (CPU tensors); default nccl where CUDA is "
                    "used (--device), else gloo")
    ap.add_argument("--nproc", type=_int_in(1, None, "--nproc"), default=None,
                    help="without torchrun: spawn this many local ranks (default 1, or 2 with "
                    "--quick on CPU)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a collective may wait for the other ranks (default 300)")
    # the engines
    ap.add_argument("--engine-step", action="store_true",
                    help="time a SAMPa step with and without the gradient exchange")
    ap.add_argument("--model", default="resnet56",
                    help="model of --engine-step (bench/models_bench.py: resnet56, wrn28_10, "
                    "resnet8_tiny, wrn10_1_tiny)")
    ap.add_argument("--batch", type=_int_in(1, None, "--batch"), default=None,
                    help="global batch of --engine-step (default: the model's, 16 on CPU)")
    ap.add_argument("--image", type=_int_in(1, None, "--image"), default=None,
                    help="image height and width of --engine-step (default: the model's, 8 on CPU)")
    ap.add_argument("--steps", type=_int_in(1, None, "--steps"), default=None,
                    help="timed steps per round and setting (default 10)")
    ap.add_argument("--rounds", type=_int_in(1, None, "--rounds"), default=None,
                    help="rounds; each times both settings, in alternating order (default 5)")
    ap.add_argument("--step-warmup", type=_int_in(0, None, "--step-warmup"), default=None,
                    help="untimed steps first (default 5)")
    # output
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--plot", type=Path, default=None, help="plot busbw against size here (PNG)")
    ap.add_argument("--note", default=None, help="a note stored in the JSON")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: with CUDA, peer_copy and copy on cuda:0 and a peer-engine "
                    "step in one process, with the targets in the JSON; without, 2 gloo ranks, "
                    "all_reduce and sendrecv, and a distributed-engine step")
    ap.add_argument("--corrupt", type=_int_in(0, None, "--corrupt"), default=None, metavar="RANK",
                    help="self-test of -c: this rank changes one element of each result it "
                    "checks; #wrong must then be > 0")
    return ap


def under_torchrun() -> bool:
    return all(v in os.environ for v in ENV_RANK)


def uses_cuda(args: argparse.Namespace) -> bool:
    """Whether this run touches CUDA: --device cpu runs everything as on a
    machine without it, whatever this one has."""
    return args.device != "cpu" and torch.cuda.is_available()


def finish_args(args: argparse.Namespace, ap: argparse.ArgumentParser, cuda: bool) -> None:
    """Defaults (nccl-tests', or --quick's) and the checks that need no process group."""
    quick_gpu = args.quick and cuda
    quick = {}
    if args.quick:
        if quick_gpu:   # short, but the largest size must be bandwidth-bound
            quick = dict(minbytes=64 << 10, maxbytes=256 << 20, stepfactor=4, iters=20,
                         warmup_iters=5, ops=list(CUDA_OPS), steps=10, rounds=3, step_warmup=5)
        else:
            quick = dict(minbytes=8, maxbytes=1 << 20, stepfactor=8, iters=5, warmup_iters=2,
                         ops=["all_reduce", "sendrecv"], steps=3, rounds=2, step_warmup=2,
                         model_cpu="resnet8_tiny")
        args.engine_step = True
        if args.model == "resnet56" and "model_cpu" in quick:
            args.model = quick["model_cpu"]
    nccl_defaults = dict(minbytes=32 << 20, maxbytes=32 << 20, stepfactor=1, stepbytes=1 << 20,
                         iters=20, warmup_iters=1, check=1, ops=["all_reduce"], steps=10,
                         rounds=5, step_warmup=5)
    for k, v in nccl_defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick.get(k, v))
    if args.device == "cuda" and not cuda:
        ap.error("--device cuda: torch.cuda.is_available() is False here; use --device cpu")
    if args.backend is None:
        args.backend = "nccl" if cuda else "gloo"
    if args.backend == "nccl" and not cuda:
        ap.error("--backend nccl needs CUDA devices and "
                 + ("--device cpu was given" if args.device == "cpu" else
                    "torch.cuda.is_available() is False here")
                 + "; use --backend gloo (CPU tensors)")
    if args.minbytes > args.maxbytes:
        ap.error(f"invalid sizes for -b/--minbytes and -e/--maxbytes: {args.minbytes} > "
                 f"{args.maxbytes}")
    if args.stepfactor == 1 and args.stepbytes <= 0 and args.maxbytes > args.minbytes:
        ap.error("-i/--stepbytes must be > 0 when -f/--stepfactor is 1")
    if args.ops == ["all"]:
        args.ops = list(COLLECTIVES) + (list(CUDA_OPS) if cuda and _ext_cuda() else [])
    cuda_ops = [o for o in args.ops if o in CUDA_OPS]
    if cuda_ops and not cuda:
        ap.error(f"{', '.join(cuda_ops)} copy between CUDA devices and this machine has none "
                 "(torch.cuda.is_available() is False); choose among "
                 f"{', '.join(COLLECTIVES)}")
    if "peer_copy" in args.ops and not _ext_cuda():
        ap.error("peer_copy needs the CUDA part of the extension sampa_fused._C (build it with "
                 "`pip install --no-build-isolation -e .` on a machine with nvcc)")
    if args.backend == "gloo" and args.op == "avg" and not DTYPES[args.datatype].is_floating_point \
            and any(o in REDUCING for o in args.ops):
        ap.error(f"gloo has no avg for integer types (-d {args.datatype}); use a floating-point "
                 "-d, another -o, or --backend nccl")
    if args.nproc is not None and under_torchrun():
        ap.error("--nproc spawns the local ranks itself; under torchrun give --nproc-per-node "
                 "to torchrun instead")
    # The world is known before any process starts: refuse what it cannot run.
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        world = args.nproc or (2 if args.quick and not cuda else 1)
        local_world = world
    if args.backend == "nccl" and local_world > torch.cuda.device_count():
        ap.error(f"NCCL needs one GPU per rank: {local_world} ranks on this node and "
                 f"{torch.cuda.device_count()} GPU(s); use fewer ranks per node, or --device cpu "
                 "(gloo, CPU ranks)")
    if args.root >= world and any(o in ROOTED for o in args.ops):
        ap.error(f"-r/--root {args.root} is not a rank of this {world}-rank run")
    if "sendrecv" in args.ops and world < 2:
        ap.error("sendrecv needs at least 2 ranks (--nproc 2, or torchrun)")
    if args.model not in _models():
        ap.error(f"--model {args.model!r}: choose among {', '.join(_models())}")
    if args.timeout <= 0:
        ap.error("--timeout must be > 0 seconds")


def _models():
    from models_bench import MODELS
    return MODELS


_EXT = "unloaded"


def _ext_cuda():
    """The extension when it has its CUDA part, else None."""
    global _EXT
    if _EXT == "unloaded":
        from sampa_fused._ext import load_extension
        ext = load_extension(required=False)
        _EXT = ext if ext is not None and ext.has_cuda() else None
    return _EXT


def sizes_of(args) -> List[int]:
    out, s = [], args.minbytes
    while s <= args.maxbytes:
        out.append(s)
        if args.stepfactor > 1:
            s *= args.stepfactor
        elif args.stepbytes > 0:
            s += args.stepbytes
        else:
            break
        if s == 0:              # -b 0 with -f: nccl-tests would loop forever
            break
    return out


# ============================================================== nccl-tests' arithmetic
def bus_factor(op: str, n: int) -> float:
    """doc/PERFORMANCE.md's correction factor from algbw to busbw."""
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("reduce_scatter", "all_gather", "alltoall"):
        return (n - 1) / n
    return 1.0


def coll_counts(op: str, nbytes: int, elt: int, n: int):
    """(send elements, receive elements, elements per rank given to the call)
    for a requested size, as nccl-tests' *GetCollByteCount: the per-rank part
    of reduce_scatter, all_gather and alltoall rounded down to 16 bytes."""
    count = nbytes // elt
    if op in ("reduce_scatter", "all_gather", "alltoall"):
        base = (count // n) & ~(max(16 // elt, 1) - 1)
        if op == "reduce_scatter":
            return base * n, base, base
        if op == "all_gather":
            return base, base * n, base
        return base * n, base * n, base
    return count, count, count


def float_str(value: float, width: int) -> str:
    """nccl-tests' getFloatStr: 2, 1 or 0 decimals, whichever fits, else exponent."""
    for fmt in ("%*.2f", "%*.1f", "%*.0f"):
        s = fmt % (width, value)
        if len(s) <= width:
            return s
    return ("%*.1e" if width >= 7 else "%*.0e") % (width, value)


def table_header(timestr: str = "time") -> str:
    e = ("", "", "", "", "")
    lines = ["#",
             "# %10s  %12s  %8s  %6s  %6s           out-of-place                       in-place          " % e,
             "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % (
                 "size", "count", "type", "redop", "root", timestr, "algbw", "busbw", "#wrong",
                 timestr, "algbw", "busbw", "#wrong"),
             "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s " % (
                 "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)",
                 "(GB/s)", "")]
    return "\n".join(lines)


def _half_str(half: Optional[Dict], check: bool) -> str:
    if half is None:
        return "  %7s  %6s  %6s  %6s" % ("N/A", "N/A", "N/A", "N/A")
    s = "  %7s  %6s  %6s" % (float_str(half["time_us"], 7), float_str(half["algbw"], 6),
                             float_str(half["busbw"], 6))
    return s + ("  %6g" % float(half["wrong"]) if check else "    N/A")


def row_str(row: Dict, check: bool) -> str:
    pre = "%12li  %12li  %8s  %6s  %6s" % (row["size"], row["count"], row["type"], row["redop"],
                                          "%6i" % row["root"])
    return pre + _half_str(row["out_of_place"], check) + _half_str(row["in_place"], check)


def parse_table(text: str) -> List[List[str]]:
    """The rows of a printed table (lines not starting with '#'), split in columns."""
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# ============================================================== the ranks
class Ctx:
    """This rank's view: group, device, data type and timing."""

    def __init__(self, args, rank: int, world: int, local_rank: int, local_world: int,
                 have_group: bool):
        self.args, self.rank, self.n = args, rank, world
        self.local_rank, self.local_world = local_rank, local_world
        self.have_group = have_group
        self.backend = args.backend
        self.dtype = DTYPES[args.datatype]
        self.cuda = uses_cuda(args)
        if self.cuda:
            ndev = torch.cuda.device_count()
            self.gpu = torch.device("cuda", local_rank % ndev)
            self.peer_gpu = torch.device("cuda", (local_rank + 1) % ndev)
        else:
            self.gpu = self.peer_gpu = None
        # Where the collectives' tensors live.
        self.device = self.gpu if self.backend == "nccl" else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.gpu) if self.cuda else None

    # -- small collectives of the harness (not timed)
    def barrier(self) -> None:
        if self.have_group:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.gpu.index])
            else:
                dist.barrier()

    def _scalar(self, v: float) -> torch.Tensor:
        return torch.tensor([float(v)], dtype=torch.float64, device=self.device)

    def combine_time(self, seconds: float) -> float:
        """-a: 0 rank 0's time, 1 the mean, 2 the min, 3 the max over ranks."""
        if not self.have_group or self.n == 1:
            return seconds
        x = self._scalar(seconds)
        how = self.args.average
        if how == 0:
            dist.broadcast(x, src=0)
        else:
            dist.all_reduce(x, op={1: dist.ReduceOp.SUM, 2: dist.ReduceOp.MIN,
                                   3: dist.ReduceOp.MAX}[how])
            if how == 1:
                x /= self.n
        return float(x.item())

    def sum_int(self, v: int) -> int:
        if not self.have_group or self.n == 1:
            return v
        x = self._scalar(v)
        dist.all_reduce(x)
        return int(x.item())

    def gather_objects(self, obj) -> List:
        if not self.have_group or self.n == 1:
            return [obj]
        out: List = [None] * self.n
        dist.all_gather_object(out, obj)
        return out


# ---------------------------------------------------------------- data patterns
def pattern(rank: int, count: int, offset: int, rep: int, redop: str, dtype: torch.dtype, n: int,
            device) -> torch.Tensor:
    """Rank `rank`'s input, as exact int64 values: small non-negative integers
    (1 or 2 for prod), chosen so that the reduction over n ranks is exact in
    `dtype` in any order (the reference is computed in int64/float64)."""
    i = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    if redop == "prod":
        return 1 + ((i * 3 + rank * 5 + rep) % 7 == 0).to(torch.int64)
    m = max(2, min(64, EXACT_LIMIT[dtype] // max(n, 1)))
    return (i * 3 + rank * 5 + rep * 7) % m


def reduce_values(vals: Sequence[torch.Tensor], redop: str, n: int, dtype: torch.dtype):
    """The expected result in `dtype` of reducing the int64 inputs `vals`:
    accumulated in float64 for floating types (exact here, and a product
    that overflows the type overflows in float64 too), in int64 for integer
    types (wrapping, as the narrow type does)."""
    acc = vals[0].to(torch.float64 if dtype.is_floating_point else torch.int64, copy=True)
    for v in vals[1:]:
        if redop in ("sum", "avg"):
            acc += v
        elif redop == "prod":
            acc *= v
        elif redop == "min":
            torch.minimum(acc, v, out=acc)
        else:
            torch.maximum(acc, v, out=acc)
    if redop == "avg":
        acc = acc / n if dtype.is_floating_point else acc // n   # non-negative: floor == trunc
    return acc.to(dtype)


def corrupt_one(t: torch.Tensor) -> None:
    """Change one element (mid-buffer) so that it surely differs: +1 can be
    lost to rounding (bf16: 512 + 1 == 512), -x-1 and x^1 cannot."""
    x = t.view(-1)[t.numel() // 2:t.numel() // 2 + 1]
    if t.dtype.is_floating_point:
        x.neg_().sub_(1)            # the patterns are >= 0, so the sign flips
    else:
        x.bitwise_xor_(1)


def count_wrong(got: torch.Tensor, want: torch.Tensor, redop: str) -> int:
    want = want.to(got.device)
    if redop == "avg" and got.dtype.is_floating_point:
        g, w = got.to(torch.float64), want.to(torch.float64)
        tol = AVG_RTOL[got.dtype] * w.abs().clamp_min(1.0)
        return int(((g - w).abs() > tol).sum().item())
    return int((got != want).sum().item())


# ---------------------------------------------------------------- the ops
class Op:
    """One op at one size on this rank: run() is what is timed; fill() and
    wrong() make and count a checked call."""
    has_in_place = True

    def __init__(self, ctx: Ctx, name: str, nbytes: int):
        self.ctx, self.name = ctx, name
        a = ctx.args
        self.elt = torch.empty((), dtype=ctx.dtype).element_size()
        self.sendcount, self.recvcount, self.count = coll_counts(name, nbytes, self.elt, ctx.n)
        self.size = max(self.sendcount, self.recvcount) * self.elt
        self.redop = a.op if (name in REDUCING or name == "sendrecv") else "none"
        self.root = a.root if name in ROOTED else -1
        self.torch_op = getattr(dist.ReduceOp, REDOPS[a.op])
        self.pat = a.op if name in REDUCING else "none"     # prod patterns only where it reduces
        dev = self.device()
        # nccl-tests' layout: the receive buffer holds the larger of both, and
        # in place the input sits inside it.
        self.send = torch.zeros(self.sendcount, dtype=ctx.dtype, device=dev)
        self.recv = torch.zeros(max(self.sendcount, self.recvcount), dtype=ctx.dtype, device=dev)

    def device(self):
        return self.ctx.device

    def gen(self, rank: int, count: int, offset: int = 0, rep: int = 0) -> torch.Tensor:
        c = self.ctx
        return pattern(rank, count, offset, rep, self.pat, c.dtype, c.n, self.device())

    def cast(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.ctx.dtype)

    # subclasses: run(in_place), fill(in_place, rep), result(in_place) -> tensor or None,
    # expected(in_place, rep) -> tensor
    def wrong(self, in_place: bool, rep: int, corrupt: bool) -> int:
        got = self.result(in_place)
        if got is None:
            return 0
        if corrupt and got.numel():
            corrupt_one(got)
        return count_wrong(got, self.expected(in_place, rep), self.redop)


class AllReduce(Op):
    def run(self, in_place):
        dist.all_reduce(self.recv[:self.count], op=self.torch_op)

    def fill(self, in_place, rep):
        c = self.ctx
        self.send.copy_(self.cast(self.gen(c.rank, self.count, 0, rep)))
        self.recv[:self.count].copy_(self.send)   # in place: the input; out of place: torch's API

    def result(self, in_place):
        return self.recv[:self.count]

    def expected(self, in_place, rep):
        c = self.ctx
        return reduce_values([self.gen(r, self.count, 0, rep) for r in range(c.n)], self.redop,
                             c.n, c.dtype)


class ReduceScatter(Op):
    def __init__(self, *a):
        super().__init__(*a)
        self._rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def _mine(self):
        r, p = self.ctx.rank, self.count
        return self.recv[r * p:(r + 1) * p]

    def run(self, in_place):
        if in_place:
            self._rs(self._mine(), self.recv[:self.sendcount], op=self.torch_op)
        else:
            self._rs(self.recv[:self.count], self.send, op=self.torch_op)

    def fill(self, in_place, rep):
        v = self.cast(self.gen(self.ctx.rank, self.sendcount, 0, rep))
        (self.recv[:self.sendcount] if in_place else self.send).copy_(v)

    def result(self, in_place):
        return self._mine() if in_place else self.recv[:self.count]

    def expected(self, in_place, rep):
        c, p = self.ctx, self.count
        return reduce_values([self.gen(r, p, c.rank * p, rep) for r in range(c.n)], self.redop,
                             c.n, c.dtype)


class AllGather(Op):
    def __init__(self, *a):
        super().__init__(*a)
        self._ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def _mine(self):
        r, p = self.ctx.rank, self.count
        return self.recv[r * p:(r + 1) * p]

    def run(self, in_place):
        self._ag(self.recv[:self.recvcount], self._mine() if in_place else self.send)

    def fill(self, in_place, rep):
        v = self.cast(self.gen(self.ctx.rank, self.count, 0, rep))
        (self._mine() if in_place else self.send).copy_(v)

    def result(self, in_place):
        return self.recv[:self.recvcount]

    def expected(self, in_place, rep):
        return self.cast(torch.cat([self.gen(j, self.count, 0, rep) for j in range(self.ctx.n)]))


class Broadcast(Op):
    def _buf(self, in_place):
        if not in_place and self.ctx.rank == self.root:
            return self.send                  # the root sends from its send buffer
        return self.recv[:self.count]

    def run(self, in_place):
        dist.broadcast(self._buf(in_place), src=self.root)

    def fill(self, in_place, rep):
        v = self.cast(self.gen(self.ctx.rank, self.count, 0, rep))
        self.send.copy_(v)
        self.recv[:self.count].copy_(v)
        if not in_place and self.ctx.rank != self.root:
            self.recv.zero_()

    def result(self, in_place):
        return self._buf(in_place)

    def expected(self, in_place, rep):
        return self.cast(self.gen(self.root, self.count, 0, rep))


class Reduce(AllReduce):
    def run(self, in_place):
        dist.reduce(self.recv[:self.count], dst=self.root, op=self.torch_op)

    def result(self, in_place):
        # only the root's result is defined
        return self.recv[:self.count] if self.ctx.rank == self.root else None


class AllToAll(Op):
    def __init__(self, *a):
        super().__init__(*a)
        self.scratch = None

    def run(self, in_place):
        buf = self.recv[:self.recvcount]
        if in_place:
            if self.scratch is None:
                self.scratch = torch.empty_like(buf)
            dist.all_to_all_single(self.scratch, buf)
            buf.copy_(self.scratch)
        else:
            dist.all_to_all_single(buf, self.send)

    def fill(self, in_place, rep):
        v = self.cast(self.gen(self.ctx.rank, self.sendcount, 0, rep))
        (self.recv[:self.sendcount] if in_place else self.send).copy_(v)

    def result(self, in_place):
        return self.recv[:self.recvcount]

    def expected(self, in_place, rep):
        c, p = self.ctx, self.count
        return self.cast(torch.cat([self.gen(j, p, c.rank * p, rep) for j in range(c.n)]))


class SendRecv(Op):
    def __init__(self, *a):
        super().__init__(*a)
        c = self.ctx
        self.nxt, self.prv = (c.rank + 1) % c.n, (c.rank - 1) % c.n
        self.scratch = None

    def _exchange(self, src, dst):
        ops = [dist.P2POp(dist.isend, src, self.nxt), dist.P2POp(dist.irecv, dst, self.prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    def run(self, in_place):
        buf = self.recv[:self.count]
        if in_place:
            if self.scratch is None:
                self.scratch = torch.empty_like(buf)
            self._exchange(buf, self.scratch)
            buf.copy_(self.scratch)
        else:
            self._exchange(self.send, buf)

    def fill(self, in_place, rep):
        r = self.ctx.rank
        v = self.cast(self.gen(r, self.count, r * self.count, rep))
        (self.recv[:self.count] if in_place else self.send).copy_(v)

    def result(self, in_place):
        return self.recv[:self.count]

    def expected(self, in_place, rep):
        return self.cast(self.gen(self.prv, self.count, self.prv * self.count, rep))


class PeerCopy(Op):
    """The extension's PeerLink: this rank's GPU -> the next local GPU, on
    the link's own copy streams, ordered by events, as the peer engine runs
    it. Every call: begin(consumer), copy(producer), finish(consumer, owner),
    with the producer/owner the timing stream and the consumer a stream on
    the destination: non-default streams, so that the link's waits are real
    ones and the end event (after the owner waited for the consumer) comes
    after the copy has landed."""
    has_in_place = False

    def __init__(self, ctx, name, nbytes):
        super().__init__(ctx, name, nbytes)
        ext = _ext_cuda()
        a, b = ctx.gpu, ctx.peer_gpu
        self.recv = torch.zeros(self.count, dtype=ctx.dtype, device=b)
        if not hasattr(ctx, "_link"):
            hi = -1
            ctx._link_streams = (torch.cuda.Stream(a, priority=hi), torch.cuda.Stream(b, priority=hi))
            ctx._link = ext.PeerLink(a.index, b.index, ctx._link_streams[0].cuda_stream,
                                     ctx._link_streams[1].cuda_stream, False, 8 << 20)
            ctx._consumer = torch.cuda.Stream(b)
        self.link, self.consumer = ctx._link, ctx._consumer

    def device(self):
        return self.ctx.gpu

    def run(self, in_place):
        owner = torch.cuda.current_stream(self.ctx.gpu)
        self.link.begin(self.consumer.cuda_stream)
        self.link.copy(self.recv, self.send, 0, self.count, owner.cuda_stream)
        self.link.finish(self.consumer.cuda_stream, owner.cuda_stream)
        owner.wait_stream(self.consumer)

    def fill(self, in_place, rep):
        self.send.copy_(self.cast(self.gen(self.ctx.rank, self.count, 0, rep)))
        self.recv.zero_()

    def result(self, in_place):
        torch.cuda.synchronize(self.recv.device)
        return self.recv

    def expected(self, in_place, rep):
        return self.cast(self.gen(self.ctx.rank, self.count, 0, rep))


class Copy(PeerCopy):
    """The reference: one cudaMemcpyAsync device-to-device on this rank's
    GPU (the extension's memcpy_async), on the timing stream."""

    def __init__(self, ctx, name, nbytes):
        Op.__init__(self, ctx, name, nbytes)
        self.recv = torch.zeros(self.count, dtype=ctx.dtype, device=ctx.gpu)
        self.ext = _ext_cuda()

    def run(self, in_place):
        if self.ext is not None:
            self.ext.memcpy_async(self.recv, self.send, torch.cuda.current_stream(self.ctx.gpu).cuda_stream)
        else:       # the same cudaMemcpyAsync, issued by torch
            self.recv.copy_(self.send, non_blocking=True)


OPS = {"all_reduce": AllReduce, "reduce_scatter": ReduceScatter, "all_gather": AllGather,
       "broadcast": Broadcast, "reduce": Reduce, "alltoall": AllToAll, "sendrecv": SendRecv,
       "peer_copy": PeerCopy, "copy": Copy}


# ---------------------------------------------------------------- timing
def _uses_cuda_timing(ctx: Ctx, name: str) -> bool:
    return name in CUDA_OPS or ctx.backend == "nccl"


def time_calls(ctx: Ctx, op: Op, in_place: bool) -> float:
    """Seconds per call on this rank (not yet combined over ranks)."""
    a = ctx.args
    cuda = _uses_cuda_timing(ctx, op.name)
    # Collectives sync the group; the local copies only themselves.
    group_barrier = op.name not in CUDA_OPS
    with (torch.cuda.stream(ctx.stream) if cuda else _null()):
        for _ in range(a.warmup_iters):
            op.run(in_place)
        op.run(in_place)                # nccl-tests' "sync" call, then a barrier
        if cuda:
            torch.cuda.synchronize()
        if group_barrier:
            ctx.barrier()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(ctx.stream)
            for _ in range(a.iters):
                op.run(in_place)
            end.record(ctx.stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / a.iters
        t0 = time.perf_counter()
        for _ in range(a.iters):
            op.run(in_place)
        return (time.perf_counter() - t0) / a.iters


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_half(ctx: Ctx, op: Op, in_place: bool) -> Dict:
    a = ctx.args
    if a.check:
        op.fill(in_place, 99)           # as nccl-tests: real data in the timed calls too
    if ctx.cuda:   # fills and allocations ran on the default stream, the calls do not
        torch.cuda.synchronize()
    t = ctx.combine_time(time_calls(ctx, op, in_place))
    algbw = op.size / GB / t if t > 0 else 0.0
    wrong = 0
    for rep in range(a.check):
        op.fill(in_place, rep)
        if ctx.cuda:
            torch.cuda.synchronize()
        with (torch.cuda.stream(ctx.stream) if _uses_cuda_timing(ctx, op.name) else _null()):
            op.run(in_place)
        if ctx.cuda:
            torch.cuda.synchronize()
        mine = op.wrong(in_place, rep, corrupt=a.corrupt == ctx.rank)
        wrong = ctx.sum_int(mine)
        if wrong:
            break
        ctx.barrier()
    return {"time_us": t * 1e6, "algbw": algbw, "busbw": algbw * bus_factor(op.name, ctx.n),
            "wrong": wrong}


def run_table(ctx: Ctx, name: str, sizes: List[int], log) -> Dict:
    a = ctx.args
    rows = []
    log(f"# Collective test starting: {name}")
    log(table_header())
    for nbytes in sizes:
        op = OPS[name](ctx, name, nbytes)
        oop = bench_half(ctx, op, False)
        ip = bench_half(ctx, op, True) if op.has_in_place else None
        row = {"size": op.size, "count": op.count, "type": a.datatype, "redop": op.redop,
               "root": op.root, "out_of_place": oop, "in_place": ip}
        rows.append(row)
        log(row_str(row, bool(a.check)))
        del op
    halves = [h for r in rows for h in (r["out_of_place"], r["in_place"]) if h is not None]
    bad = sum(1 for h in halves if h["wrong"])
    avg = statistics.fmean(h["busbw"] for h in halves) if halves else 0.0
    log("# %-20s : %d %s" % ("Out of bounds values", bad, "FAILED" if bad else "OK"))
    log("# %-20s : %g " % ("Avg bus bandwidth", avg))
    log("#")
    return {"op": name, "world_size": ctx.n, "bus_factor": bus_factor(name, ctx.n), "rows": rows,
            "out_of_bounds": bad, "avg_busbw": avg}


# ============================================================== the engines' step
def _step_data(spec, batch: int, image: int, device, n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, spec.input_shape[0], image, image, generator=g).to(device),
             torch.randint(0, spec.classes, (batch,), generator=g).to(device)) for _ in range(n)]


def _param_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes()
                 if p.dtype not in (torch.bfloat16,) else p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _timed_rounds(ctx: Ctx, opt, data, sync, barrier) -> Dict[bool, List[float]]:
    """Per-step seconds with the exchange on (True) and off (False),
    alternating ABBA so that load drifts hit both settings alike."""
    a = ctx.args
    times: Dict[bool, List[float]] = {True: [], False: []}
    k = 0
    for r in range(a.rounds):
        for ex in ((True, False) if r % 2 == 0 else (False, True)):
            opt.engine.exchange = ex
            barrier()
            for _ in range(a.steps):
                t0 = time.perf_counter()
                opt.step(data[k % len(data)])
                sync()
                times[ex].append(time.perf_counter() - t0)
                k += 1
    opt.engine.exchange = True
    return times


def _step_summary(ctx, times, combine) -> Dict:
    on_med, off_med = (combine(statistics.median(times[x])) for x in (True, False))
    on_mean, off_mean = (combine(statistics.fmean(times[x])) for x in (True, False))
    exposed = on_med - off_med
    return {"step_ms": on_med * 1e3, "no_exchange_ms": off_med * 1e3,
            "step_mean_ms": on_mean * 1e3, "no_exchange_mean_ms": off_mean * 1e3,
            "exposed_ms": exposed * 1e3, "exposed_pct": 100.0 * exposed / on_med if on_med else 0.0}


def _engine_spec(ctx: Ctx, on_cuda: bool):
    from models_bench import MODELS
    a = ctx.args
    spec = MODELS[a.model]
    batch = a.batch or (spec.batch if on_cuda else 16)
    image = a.image or (spec.input_shape[1] if on_cuda else 8)
    return spec, batch, image


def distributed_step(ctx: Ctx) -> Dict:
    """SAMPa on the distributed engine over every rank (public API only)."""
    from models_bench import cross_entropy

    from sampa_fused import SAMPa
    a = ctx.args
    on_cuda = ctx.backend == "nccl"
    device = ctx.gpu if on_cuda else torch.device("cpu")
    spec, batch, image = _engine_spec(ctx, on_cuda)
    torch.manual_seed(0)
    model = spec.make().to(device)
    opt = SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.05, lam=0.5, lr=0.05, momentum=0.9,
                weight_decay=5e-4, engine="distributed", timeout=a.timeout)
    data = _step_data(spec, batch, image, device)
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    try:
        for i in range(a.step_warmup):
            opt.step(data[i % len(data)])
        sync()
        # The switch really cuts the exchange: replicas agree with it, not without.
        same_with = len(set(ctx.gather_objects(_param_digest(model)))) == 1
        times = _timed_rounds(ctx, opt, data, sync, ctx.barrier)
        opt.engine.exchange = False       # whatever the last round was
        for i in range(2):
            opt.step(data[i % len(data)])
        opt.engine.exchange = True
        same_without = len(set(ctx.gather_objects(_param_digest(model)))) == 1
    finally:
        opt.engine.close()
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    n = ctx.n
    if n == 2:   # each rank sends its own gradient to the other
        mode, payload, sent = "send/recv", pbytes, pbytes
    else:        # both gradient buffers all-reduced; a ring moves 2(n-1)/n of the payload out of each rank
        mode, payload = "all_reduce", 2 * pbytes
        sent = int(round(payload * 2 * (n - 1) / n))
    out = {"engine": "distributed", "ranks": n, "backend": ctx.backend, "exchange": mode,
           "model": a.model, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
           "image": image, "rounds": a.rounds, "steps_per_round": a.steps, "warmup": a.step_warmup,
           "gradient_bytes": pbytes, "payload_bytes_per_step": payload,
           "bytes_sent_per_rank_per_step": sent,
           "replicas_identical_with_exchange": same_with,
           "replicas_identical_without_exchange": same_without}
    out.update(_step_summary(ctx, times, ctx.combine_time))
    return out


def peer_step(ctx: Ctx) -> Dict:
    """SAMPa on the peer engine, this process only (rank 0 after the group is gone)."""
    from models_bench import cross_entropy

    from sampa_fused import SAMPa
    a = ctx.args
    pair = (ctx.gpu, ctx.peer_gpu)
    spec, batch, image = _engine_spec(ctx, True)
    torch.manual_seed(0)
    model = spec.make().to(pair[0])
    opt = SAMPa(model, cross_entropy, torch.optim.SGD, rho=0.05, lam=0.5, lr=0.05, momentum=0.9,
                weight_decay=5e-4, engine="peer", devices=pair)
    data = _step_data(spec, batch, image, pair[0])
    sync = torch.cuda.synchronize
    try:
        for i in range(a.step_warmup):
            opt.step(data[i % len(data)])
        sync()
        times = _timed_rounds(ctx, opt, data, sync, lambda: None)
        link_mode = opt.engine.links["ab"].mode if hasattr(opt.engine, "links") else None
    finally:
        opt.engine.close()
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    out = {"engine": "peer", "devices": [str(d) for d in pair], "link_mode": link_mode,
           "exchange": "PeerLink copies, both ways", "model": a.model,
           "params": sum(p.numel() for p in model.parameters()), "batch": batch, "image": image,
           "rounds": a.rounds, "steps_per_round": a.steps, "warmup": a.step_warmup,
           "gradient_bytes": pbytes, "payload_bytes_per_step": 2 * pbytes,
           "bytes_sent_per_rank_per_step": pbytes}
    out.update(_step_summary(ctx, times, lambda s: s))
    return out


def engine_lines(res: Dict) -> List[str]:
    lines = ["#", "# Engine step: SAMPa (SGD), exchange on vs skipped (opt.engine.exchange = False), "
             "median ms per step",
             "# %12s  %5s  %10s  %10s  %12s  %12s  %10s  %14s" % (
                 "engine", "ranks", "exchange", "step", "no-exchange", "exposed", "exposed",
                 "bytes sent"),
             "# %12s  %5s  %10s  %10s  %12s  %12s  %10s  %14s" % (
                 "", "", "", "(ms)", "(ms)", "(ms)", "(% step)", "(per rank/step)")]
    for key in ("distributed", "peer"):
        r = res.get(key)
        if r is None:
            continue
        if "skipped" in r:
            lines.append(f"# {key:>12s}  skipped: {r['skipped']}")
            continue
        ranks = r.get("ranks", 1)
        lines.append("# %12s  %5d  %10s  %10.3f  %12.3f  %12.3f  %10.2f  %14d" % (
            key, ranks, r["exchange"].split(",")[0][:10], r["step_ms"], r["no_exchange_ms"],
            r["exposed_ms"], r["exposed_pct"], r["bytes_sent_per_rank_per_step"]))
        lines.append(f"#   {key}: {r['model']}, {r['params']:,} parameters "
                     f"({r['gradient_bytes']:,} gradient bytes), batch {r['batch']} of "
                     f"{r['image']}x{r['image']}, {r['rounds']} rounds x {r['steps_per_round']} "
                     f"steps per setting" + (f", devices {' -> '.join(r['devices'])} "
                                             f"({r['link_mode']})" if key == "peer" else ""))
    lines.append("#")
    return lines


# ============================================================== machine facts, outputs
def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def rank_info(ctx: Ctx) -> Dict:
    if ctx.backend == "nccl" or (ctx.cuda and any(o in CUDA_OPS for o in ctx.args.ops)):
        dev, name = str(ctx.gpu), torch.cuda.get_device_name(ctx.gpu)
    else:
        dev, name = "cpu", _cpu_name()
    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "host": socket.gethostname(),
            "pid": os.getpid(), "device": dev, "device_name": name, "backend": ctx.backend}


def header_lines(ctx: Ctx, ranks: List[Dict]) -> List[str]:
    a = ctx.args
    step = (f"{a.stepfactor}(factor)" if a.stepfactor > 1 else f"{a.stepbytes}(bytes)")
    hosts = sorted({r["host"] for r in ranks})
    lines = [f"# bench_comm.py (sampa-fused), nccl-tests style: torch {torch.__version__}, "
             f"backend {ctx.backend}, {ctx.n} rank(s) on {len(hosts)} node(s)",
             f"# ops: {','.join(a.ops)}",
             f"# minBytes {a.minbytes} maxBytes {a.maxbytes} step: {step} warmup iters: "
             f"{a.warmup_iters} iters: {a.iters} validation: {a.check} datatype: {a.datatype} "
             f"redop: {a.op} root: {a.root} average: {a.average}",
             "#", "# Using devices"]
    for r in ranks:
        lines.append("#  Rank %2d Group %2d Pid %6d on %10s device %7s [%s] %s" % (
            r["rank"], 0, r["pid"], r["host"], r["device"], r["backend"], r["device_name"]))
    return lines


def _versions() -> Dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: say so
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def targets(tables: Dict, engine: Dict) -> Dict:
    """The GPU targets, where this run measured what they need."""
    out = {}
    pc, cp = tables.get("peer_copy"), tables.get("copy")
    if pc and cp and pc["rows"] and cp["rows"]:
        top = max(r["size"] for r in pc["rows"])
        a = next(r for r in pc["rows"] if r["size"] == top)["out_of_place"]["algbw"]
        b = next((r for r in cp["rows"] if r["size"] == top), None)
        if b is not None and b["out_of_place"]["algbw"] > 0:
            v = a / b["out_of_place"]["algbw"]
            out["peer_copy_vs_memcpy"] = {
                "value": v, "goal": TARGET_PEER_VS_COPY, "met": v >= TARGET_PEER_VS_COPY,
                "what": f"peer_copy algbw / copy (cudaMemcpyAsync device-to-device) algbw at "
                        f"{top} bytes, >= goal"}
    p = (engine or {}).get("peer")
    if p and "skipped" not in p:
        v = p["exposed_pct"] / 100.0
        out["peer_step_exposed_fraction"] = {
            "value": v, "goal": TARGET_EXPOSED, "met": v <= TARGET_EXPOSED,
            "what": "exposed communication of a peer-engine SAMPa step / step time, <= goal"}
    return out


def plot(results: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, t in results["tables"].items():
        pts = [(r["size"], r["out_of_place"]["busbw"]) for r in t["rows"]
               if r["size"] > 0 and r["out_of_place"]["busbw"] > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw, out-of-place (GB/s)")
    devs = sorted({r["device_name"] for r in results["ranks"]})
    ax.set_title(f"bench_comm: {results['backend']}, {results['world_size']} ranks, "
                 f"{', '.join(devs)[:60]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================== main
def rank_main(args) -> int:
    """One rank (under torchrun, a --nproc child, or the only process)."""
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    cuda = uses_cuda(args)
    need_group = world > 1 or any(o in COLLECTIVES for o in args.ops)
    if need_group:
        if cuda and args.backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=args.timeout)
        if under_torchrun():
            dist.init_process_group(args.backend, timeout=timeout)
        else:   # a 1-rank group over loopback
            store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout)
            dist.init_process_group(args.backend, store=store, rank=0, world_size=1,
                                    timeout=timeout)
    ctx = Ctx(args, rank, world, local_rank, local_world, need_group)
    out = print if rank == 0 else (lambda *a, **k: None)

    def log(s):
        out(s, flush=True)

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.time()
    ranks = ctx.gather_objects(rank_info(ctx))
    for ln in header_lines(ctx, ranks):
        log(ln)
    sizes = sizes_of(args)
    tables = {}
    for name in args.ops:
        tables[name] = run_table(ctx, name, sizes, log)
    engine: Dict = {}
    if args.engine_step:
        if world >= 2 and world % 2 == 0:
            engine["distributed"] = distributed_step(ctx)
        else:
            engine["distributed"] = {"skipped": f"needs an even world size >= 2, this run has "
                                                f"{world} rank(s) (--nproc 2, or torchrun)"}
    if need_group:
        ctx.barrier()
        dist.destroy_process_group()
        ctx.have_group = False
    if args.engine_step:
        if rank == 0:
            if cuda and _ext_cuda() is not None:
                engine["peer"] = peer_step(ctx)
            else:
                engine["peer"] = {"skipped": "needs CUDA and the extension's CUDA part"
                                  if not cuda else "needs the extension's CUDA part "
                                  "(sampa_fused._C built with nvcc)"}
        for ln in engine_lines(engine):
            log(ln)
    bad = sum(t["out_of_bounds"] for t in tables.values())
    log(f"# Collective test concluded: bench_comm.py ({time.time() - t_start:.1f} s)")
    if rank != 0:
        # Rank 0 reports a failed check (status 1), once it has written its files:
        # a launcher may stop every rank as soon as one exits with an error.
        return 0
    results = {"benchmark": "bench_comm", "backend": args.backend, "world_size": world,
               "nnodes": len({r["host"] for r in ranks}), "hosts": sorted({r["host"] for r in ranks}),
               "device_name": ranks[0]["device_name"],
               "device_names": sorted({r["device_name"] for r in ranks}), **_versions(),
               "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "command": shlex.join([sys.executable] + sys.argv),
               "launcher": (f"bench_comm.py --nproc {os.environ['BENCH_COMM_NPROC']}"
                            if "BENCH_COMM_NPROC" in os.environ else
                            "torchrun" if under_torchrun() else "one process"),
               "ranks": ranks,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "loadavg_start": load0,
                           "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
               "tables": tables, "engine_step": engine, "targets": targets(tables, engine),
               "when": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.note:
        results["note"] = args.note
    for name, t in results["targets"].items():
        log(f"# target {name}: {t['value']:.3f} (goal {t['goal']}) {'MET' if t['met'] else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        log(f"# wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        log(f"# wrote {args.plot}")
    if bad:
        print(f"bench_comm.py: data check failed in {bad} row half(s): see #wrong",
              file=sys.stderr, flush=True)
        return 1
    return 0


def spawn(nproc: int, argv: List[str]) -> int:
    """--nproc N: N local ranks, each this script under torchrun's environment
    variables (so each runs exactly the code torchrun would run)."""
    child_argv, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--nproc":
            skip = True
            continue
        if tok.startswith("--nproc="):
            continue
        child_argv.append(tok)
    from sampa_fused.launch import start_ranks
    procs = start_ranks([sys.executable, str(Path(__file__).resolve())] + child_argv, nproc,
                        env=dict(os.environ, BENCH_COMM_NPROC=str(nproc)))
    rc = 0
    try:
        live = list(procs)
        while live:
            for p in list(live):
                code = p.poll()
                if code is None:
                    continue
                live.remove(p)
                if code != 0 and rc == 0:
                    rc = code
                    if code != 1:      # 1: a failed data check, the others finish too
                        for q in live:  # a dead rank leaves the others waiting: stop them
                            q.terminate()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    cuda = uses_cuda(args)
    finish_args(args, ap, cuda)
    nproc = args.nproc
    if nproc is None and args.quick and not cuda and not under_torchrun():
        nproc = 2               # the gloo path needs two ranks
    if nproc is not None and nproc > 1:
        return spawn(nproc, argv)
    try:
        return rank_main(args)
    except SystemExit:
        raise
    except BaseException:
        # Status 2: the --nproc parent then stops the other ranks (1 is a failed data check).
        traceback.print_exc()
        sys.stdout.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
