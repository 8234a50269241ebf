"""Bandwidth of the fused Triton kernels, and the elementwise part of one SAMPa
step against per-parameter and foreach implementations of the same math.

Part 1, kernels: achieved GB/s of each kernel of backend="triton" on flat fp32
buffers of P elements, next to a plain device-to-device copy (`dst.copy_(src)`)
moving the same number of bytes. Bytes are counted as in the README's 'What a step moves': every
buffer a kernel reads plus every buffer it writes, P elements each (so a copy
of P elements moves 2P). Steady state (not the first step), SGD with
momentum 0.9 and weight decay, AdamW without amsgrad:

    sgd_pre      reads x, gy, buf               writes xt, y             5 passes
    sgd_post     reads x, g, gy_new, buf        writes x, buf, gy        7
    adamw_pre    reads x, gy, m, v              writes xt, y             6
    adamw_post   reads x, g, gy_new, m, v       writes x, m, v, gy       9
    sam_perturb  reads x, g                     writes xt                3
    sam_post     reads x, g, buf                writes x, buf            5
    check        reads g, gy_new (finite check and ||gy_new||^2)         2

So one SGD-momentum SAMPa step moves 5 + 2 + 7 = 14 passes of P, against the
11 of the README's floor ('What a step moves'): the xt pass buffer (the x̃-pass runs on it, so
x is never overwritten), the gy commit (gy kept unchanged when a step is
refused) and the check (the finite decision comes before any state is
written) are the extra 3. (The serial engine forms xt and y in two launches,
one before each pass, reading x and gy twice.) The per-kernel GB/s say how
close each kernel is to the copy bandwidth; the step totals of part 2
include all 14 passes.

Part 2, steps: the whole elementwise part of one SAMPa step (pre-gradient
update, check, post-gradient update; SGD momentum 0.9, weight decay 5e-4,
rho 0.05, lam 0.2) on the parameter shapes of
    resnet56  ResNet-56 for CIFAR: 167 tensors, 0.853M parameters
    100m      8 transformer blocks of width 1024: 96 tensors, 100.8M parameters
as
    fused     backend="triton" on flat buffers (what SAMPa runs on CUDA)
    flat      backend="torch" on flat buffers (the reference backend)
    foreach   the same math over per-tensor lists with torch._foreach_* ops
    loop      the published reference script's pattern (README,
              'Differences from the official script'): Python
              loops over tensors, torch.cat of gradients, parameters moved
              there and back by add/sub, torch.optim.SGD (default settings)
              for the step; the two ranks' work and the all-reduce (a sum)
              run one after the other on one device.
A step time is wall-clock over back-to-back steps with the device synchronised
only before and after, so it counts launch overhead as a training loop sees it.

    python bench/bench_kernels.py                          # CUDA: P = 1e5 .. 2.5e8, both lists
    python bench/bench_kernels.py --device cpu             # Triton interpreter, small sizes
    python bench/bench_kernels.py --sizes 1e6,6.4e7 --lists resnet56 --block 4096 --num-warps 8
    python bench/bench_kernels.py --quick --json out.json  # CUDA: P = 64M and resnet56 only

Writes bench/results/<device-name>-kernels.json and .png (--json PATH: PATH
and the .png beside it). Targets (H100): >= 90% of copy bandwidth for P >= 64M;
on resnet56 fused >= 10x faster than loop and >= 2x faster than foreach; the
JSON's "targets" holds each as {"value", "goal", "cmp", "met"}. --quick keeps
only what the targets need (P = 64M, the resnet56 list: well under a minute
on an H100). On CPU the kernels run in Triton's interpreter: the numbers only
show that the script works, and the targets' "met" is null there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

HERE = Path(__file__).resolve().parent
RHO, LAM, LR, MOMENTUM, WD = 0.05, 0.2, 0.05, 0.9, 5e-4
EPS = 1e-12

KERNEL_PASSES = {"sgd_pre": 5, "sgd_post": 7, "adamw_pre": 6, "adamw_post": 9,
                 "sam_perturb": 3, "sam_post": 5, "check": 2}
STEP_METHODS = ("fused", "flat", "foreach", "loop")


def _setup_env(device: str) -> None:
    """The interpreter must be chosen before triton (and our kernels) are imported."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import sampa_fused  # noqa: F401
    except ImportError:      # run from a checkout without installing the package
        sys.path.insert(0, str(HERE.parent))


# ---------------------------------------------------------------- shapes
def param_shapes(name: str) -> List[Tuple[int, ...]]:
    if name == "resnet56":
        shapes: List[Tuple[int, ...]] = [(16, 3, 3, 3), (16,), (16,)]
        c_in = 16
        for c in (16, 32, 64):
            for _ in range(9):
                shapes += [(c, c_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
                c_in = c
        return shapes + [(10, 64), (10,)]
    if name == "100m":
        d, shapes = 1024, []
        for _ in range(8):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                       (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        return shapes
    if name == "tiny":                       # for quick smoke runs
        return [(37, 13), (37,), (5, 37), (5,), (1,)]
    raise ValueError(f"unknown parameter list {name!r}: choose resnet56, 100m or tiny")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- timing
def timer(device):
    import torch
    if device.type == "cuda":
        def run(fn: Callable, warmup: int, reps: int, inner: int = 1) -> float:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
            return statistics.median(times)
    else:
        def run(fn: Callable, warmup: int, reps: int, inner: int = 1) -> float:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
            return statistics.median(times)
    return run


def wall(device, fn: Callable, warmup: int, reps: int) -> float:
    """Seconds per call over `reps` back-to-back calls, synchronised only at the ends."""
    import torch
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


# ---------------------------------------------------------------- flat buffers
class Backend:
    """Where the update layer runs: 'triton' (with a launch config) or 'torch'."""

    def __init__(self, name: str, config=None):
        self.name, self.config = name, config


class Flat:
    """One layout of `shapes` (one slab, one param group) with random buffers,
    updated through the optimizer's own update layer (sampa_fused.update), at
    a steady-state step count."""

    def __init__(self, shapes, device, backend: Backend, rule_name: str = "sgd", seed=0, step=3):
        import torch

        from sampa_fused.state import FlatState
        from sampa_fused.update import Update, adamw, sgd
        rule = {"sgd": sgd, "adamw": adamw}[rule_name]
        hp = (sgd.hyper(dict(lr=LR, momentum=MOMENTUM, dampening=0.0, nesterov=False, weight_decay=WD,
                             maximize=False), "bench") if rule_name == "sgd" else
              adamw.hyper(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                               maximize=False), "bench"))
        params = [torch.nn.Parameter(torch.empty(s, device=device)) for s in shapes]
        self.flat = FlatState(params, [0] * len(params), [f"p{i}" for i in range(len(params))],
                              ("x", "g", "xt", "y", "gy_new", "gy"), rule, backend.name)
        self.rep = self.flat.primary
        self.update = Update(rule, self.flat)
        if backend.config is not None:
            self.update._cfgs[self.rep.device] = backend.config
        self.flat.allocate_state([hp], [self.rep])
        self.flat.set_counts([step] * len(params))
        self.update.refresh([(hp, RHO, LAM)], [self.rep])
        self.b = self.rep.slabs[0]
        gen = torch.Generator(device=device).manual_seed(seed)
        for name in ("x", "g", "xt", "y", "gy_new", "gy"):
            getattr(self.b, name).normal_(generator=gen)
        for name, t in self.b.state.items():
            t.normal_(generator=gen)
            if "sq" in name:
                t.abs_()
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.rep.gy_sq.fill_(9.0)             # ||gy|| = 3

    def pre(self):
        self.update.sampa_pre([self.rep])

    def check(self):
        return self.update.check([self.rep], (), ("g", "gy_new"), "gy_new", [None])[0]

    def post(self):
        self.update.sampa_post([self.rep], [(self.ok, self.rep.gy_sq)], [None])

    def perturb(self):
        self.update.sam_perturb([self.rep], [(self.ok, self.rep.gy_sq)], [None])

    def sam_post(self):
        self.update.sam_post([self.rep], [(self.ok, self.rep.gy_sq)], [None])


def kernel_calls(P: int, device, backend: Backend) -> Tuple[Dict[str, Callable], list]:
    """One callable per kernel on fp32 buffers of P elements (steady state: step 3)."""
    fs = Flat([(P,)], device, backend, "sgd")
    fa = Flat([(P,)], device, backend, "adamw", seed=1)
    fs.b.g.mul_(1e-3)                  # keep repeated in-place steps finite
    fa.b.g.mul_(1e-3)
    calls = {
        "sgd_pre": fs.pre,
        "sgd_post": fs.post,
        "adamw_pre": fa.pre,
        "adamw_post": fa.post,
        "sam_perturb": fs.perturb,
        "sam_post": fs.sam_post,
        "check": fs.check,
    }
    return calls, [fs.b, fa.b]


def bench_kernels(device, sizes: Sequence[int], backend, warmup: int, reps: int, inner: int,
                  log=print) -> List[dict]:
    import torch
    run = timer(device)
    rows = []
    for P in sizes:
        calls, keep = kernel_calls(P, device, backend)
        copy_cache: Dict[int, float] = {}
        for name, fn in calls.items():
            passes = KERNEL_PASSES[name]
            nbytes = passes * P * 4
            t = run(fn, warmup, reps, inner)
            if passes not in copy_cache:     # a copy moving the same bytes: read n, write n
                n = (passes * P + 1) // 2
                src = torch.randn(n, device=device)
                dst = torch.empty_like(src)
                copy_cache[passes] = run(lambda: dst.copy_(src), warmup, reps, inner)
                del src, dst
            tc = copy_cache[passes]
            row = dict(kernel=name, P=P, bytes=nbytes, time_s=t, GBps=nbytes / t / 1e9,
                       copy_time_s=tc, copy_GBps=nbytes / tc / 1e9, fraction_of_copy=tc / t)
            rows.append(row)
            log(f"  P={P:>11,d} {name:<12} {t * 1e6:10.1f} us {row['GBps']:8.1f} GB/s "
                f"(copy {row['copy_GBps']:8.1f} GB/s, {100 * row['fraction_of_copy']:5.1f}%)")
        del calls, keep
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- steps
class FlatStep:
    """The elementwise part of one SAMPa step as the optimizer runs it on flat
    buffers: the pre-gradient update, the check, the post-gradient update."""

    def __init__(self, shapes, device, backend: Backend):
        self.f = Flat(shapes, device, backend, "sgd", step=1)
        self.b = self.f.b
        for n in ("g", "gy", "gy_new"):
            getattr(self.b, n).mul_(1e-3)
        self.f.rep.gy_sq.copy_(self.b.gy.square().sum())

    def load(self, x, buf, gy, g, gy_new):
        """Dense P-vectors into the (padded) flat buffers; padding set to 0."""
        b = self.b
        for dst, src in ((b.x, x), (b.state["momentum_buffer"], buf), (b.gy, gy), (b.g, g),
                         (b.gy_new, gy_new)):
            dst.zero_()
            off = 0
            for v in b.slab.views(dst):
                v.copy_(src[off:off + v.numel()].view_as(v))
                off += v.numel()
        self.f.rep.gy_sq.copy_(b.gy.square().sum())

    def step(self):
        f = self.f
        f.pre()
        # (the two gradient passes run here)
        checks = f.update.check([f.rep], (), ("g", "gy_new"), "gy_new", [None])
        f.update.sampa_post([f.rep], checks, [None])

    def flat_x(self):
        return __import__("torch").cat([v.flatten() for v in self.b.slab.views(self.b.x)])


class ForeachStep:
    """The same math over per-tensor lists with torch._foreach_* ops."""

    def __init__(self, shapes, device):
        import torch
        self.torch = torch
        mk = lambda: [torch.randn(s, device=device) for s in shapes]  # noqa: E731
        self.x, self.x_save, self.y, self.buf = mk(), mk(), mk(), mk()
        self.gy, self.g, self.gy_new = mk(), mk(), mk()

    def load(self, x, buf, gy, g, gy_new):
        for dst, src in ((self.x, x), (self.buf, buf), (self.gy, gy), (self.g, g), (self.gy_new, gy_new)):
            off = 0
            for t in dst:
                t.copy_(src[off:off + t.numel()].view_as(t))
                off += t.numel()

    def step(self):
        torch = self.torch
        fe = torch
        gy_norm = torch.linalg.vector_norm(torch.stack(fe._foreach_norm(self.gy)))
        scale = RHO / (gy_norm + EPS)
        fe._foreach_copy_(self.x_save, self.x)
        d = fe._foreach_add(self.gy, self.x, alpha=WD)                        # peek
        nb = fe._foreach_mul(self.buf, MOMENTUM)
        fe._foreach_add_(nb, d, alpha=1.0)
        fe._foreach_copy_(self.y, fe._foreach_add(self.x, nb, alpha=-LR))
        fe._foreach_add_(self.x, fe._foreach_mul(self.gy, scale))             # xt
        # (the two gradient passes run here)
        finite = torch.isfinite(torch.stack(fe._foreach_norm(self.g))).all()  # check
        sq = torch.stack(fe._foreach_norm(self.gy_new)).square().sum()
        ok = finite & torch.isfinite(sq)  # noqa: F841
        gt = fe._foreach_mul(self.g, 1 - LAM)                                 # mix
        fe._foreach_add_(gt, self.gy_new, alpha=LAM)
        fe._foreach_add_(gt, self.x_save, alpha=WD)                           # base step
        fe._foreach_mul_(self.buf, MOMENTUM)
        fe._foreach_add_(self.buf, gt, alpha=1.0)
        fe._foreach_copy_(self.x, self.x_save)
        fe._foreach_add_(self.x, self.buf, alpha=-LR)
        fe._foreach_copy_(self.gy, self.gy_new)                               # commit

    def flat_x(self):
        return self.torch.cat([t.flatten() for t in self.x])


class LoopStep:
    """README, 'Differences from the official script': the published script's per-parameter pattern, both
    ranks' work on one device, the all-reduce replaced by a sum."""

    def __init__(self, shapes, device):
        import torch
        self.torch = torch
        self.params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]   # rank 0
        self.yparams = [torch.nn.Parameter(p.detach().clone()) for p in self.params]        # rank 1
        for p, q in zip(self.params, self.yparams):
            p.grad, q.grad = torch.randn_like(p), torch.randn_like(p)
        self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        P = sum(p.numel() for p in self.params)
        self.reduced = torch.randn(P, device=device)      # last step's all-reduced gradient
        self.gx_part = torch.randn(P, device=device)      # rank 0's share of it
        self.fresh_g = [p.grad.clone() for p in self.params]
        self.fresh_gy = [q.grad.clone() for q in self.yparams]

    def load(self, x, buf, gy, g, gy_new):
        torch = self.torch
        views = lambda flat: [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self._offsets())]  # noqa: E731
        with torch.no_grad():
            for p, q, v in zip(self.params, self.yparams, views(x)):
                p.copy_(v)
                q.copy_(v)
        for p, v in zip(self.params, views(buf)):
            self.opt.state[p]["momentum_buffer"] = v.clone()
        self.fresh_g = [v.clone() for v in views(g)]
        self.fresh_gy = [v.clone() for v in views(gy_new)]
        # gy_t is recovered from last step's reduced buffer: reduced = (1-lam) gx + lam gy
        self.gx_part = torch.zeros_like(gy)
        self.reduced = (gy * LAM).clone()

    def _offsets(self):
        out, off = [], 0
        for p in self.params:
            out.append(off)
            off += p.numel()
        return out

    def step(self):
        torch = self.torch
        params, yparams = self.params, self.yparams
        with torch.no_grad():
            # rank 0: gy from the last reduced buffer, its norm, xt by a loop
            gy = (self.reduced - self.gx_part) / LAM
            scale = RHO / (gy.norm() + EPS)
            off = 0
            for p in params:
                n = p.numel()
                p.add_(gy[off:off + n].view_as(p) * scale)
                off += n
            # rank 1: the peek as the published script builds it (wd * p + momentum * buf
            # per tensor, torch.cat), subtracted by a loop
            d = torch.cat([(WD * p + MOMENTUM * self.opt.state[p]["momentum_buffer"]).view(-1)
                           if "momentum_buffer" in self.opt.state[p] else (WD * p).view(-1)
                           for p in params])
            off = 0
            for q in yparams:
                n = q.numel()
                q.sub_(LR * d[off:off + n].view_as(q))
                off += n
        # (the two gradient passes run here: they fill p.grad and q.grad)
        for p, q, g, gyn in zip(params, yparams, self.fresh_g, self.fresh_gy):
            p.grad, q.grad = g, gyn
        with torch.no_grad():
            gx = torch.cat([p.grad.view(-1) for p in params]) * (1 - LAM)
            gyl = torch.cat([q.grad.view(-1) for q in yparams]) * LAM
            reduced = gx + gyl                                           # all_reduce(SUM)
            off = 0
            for p, q in zip(params, yparams):                            # restore, grads as views
                n = p.numel()
                p.sub_(gy[off:off + n].view_as(p) * scale)
                q.add_(LR * d[off:off + n].view_as(q))
                p.grad = reduced[off:off + n].view_as(p)
                off += n
        self.opt.step()
        self.opt.zero_grad()
        self.reduced, self.gx_part = reduced, gx

    def flat_x(self):
        return self.torch.cat([p.detach().flatten() for p in self.params])


def bench_steps(device, lists: Sequence[str], backend, warmup: int, reps: int, log=print,
                methods: Sequence[str] = STEP_METHODS) -> List[dict]:
    import torch
    rows = []
    for name in lists:
        shapes = param_shapes(name)
        P = sum(numel(s) for s in shapes)
        gen = torch.Generator(device=device).manual_seed(7)
        init = [torch.randn(P, device=device, generator=gen) * s for s in (1.0, 1e-2, 1e-3, 1e-3, 1e-3)]
        steppers = {}
        for m in methods:
            if m == "fused":
                st = FlatStep(shapes, device, backend)
            elif m == "flat":
                st = FlatStep(shapes, device, Backend("torch"))
            elif m == "foreach":
                st = ForeachStep(shapes, device)
            elif m == "loop":
                st = LoopStep(shapes, device)
            else:
                raise ValueError(f"unknown step method {m!r}: choose from {STEP_METHODS}")
            steppers[m] = st
        # Same math: one step from the same state lands on the same x.
        xs = {}
        for m, st in steppers.items():
            st.load(*init)
            st.step()
            xs[m] = st.flat_x()
        ref = xs.get("flat")
        times = {}
        for m, st in steppers.items():
            times[m] = wall(device, st.step, warmup, reps)
        for m in steppers:
            diff = None if ref is None else ((xs[m] - ref).abs().max() / ref.abs().max()).item()
            row = dict(list=name, params=P, tensors=len(shapes), method=m, time_s=times[m],
                       max_rel_diff_vs_flat=diff)
            for other in ("loop", "foreach"):
                if other in times:
                    row[f"speedup_vs_{other}"] = times[other] / times[m]
            rows.append(row)
            log(f"  {name:<9} {m:<8} {times[m] * 1e6:12.1f} us/step"
                + (f"  (x vs flat: {diff:.1e})" if diff is not None else "")
                + "".join(f"  {times[o] / times[m]:6.2f}x vs {o}" for o in ("loop", "foreach") if o in times))
        del steppers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- output
def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


# The targets of the issue (an H100). Every benchmark script writes them as
# {name: {"value", "goal", "cmp", "met", "what"}}; scripts/gpu_check.py reads them.
BANDWIDTH_GOAL = 0.9          # fraction of a device-to-device copy of the same bytes
BANDWIDTH_MIN_P = 64_000_000
SPEEDUP_GOALS = {"loop": 10.0, "foreach": 2.0}


def target(value, goal: float, cmp: str, what: str, applies: bool = True, note=None) -> dict:
    """One target entry; met is None when nothing was measured or the target
    does not apply (not a GPU run), else whether value cmp goal holds."""
    met = None
    if value is not None and applies:
        met = bool(value >= goal) if cmp == ">=" else bool(value <= goal)
    out = {"value": value, "goal": goal, "cmp": cmp, "met": met, "what": what}
    if note or (value is not None and not applies):
        out["note"] = note or "measured off a GPU: the targets are for an H100"
    elif value is None:
        out["note"] = "not measured in this run"
    return out


def targets(kernels: List[dict], steps: List[dict], gpu: bool) -> dict:
    """The H100 targets: per kernel, the least fraction of copy bandwidth over
    the sizes P >= 64M; the resnet56 step speed-ups of the fused path."""
    out = {}
    big = [r for r in kernels if r["P"] >= BANDWIDTH_MIN_P]
    for name in KERNEL_PASSES:
        rows = [r["fraction_of_copy"] for r in big if r["kernel"] == name]
        out[f"bandwidth_{name}_fraction_of_copy"] = target(
            min(rows, default=None), BANDWIDTH_GOAL, ">=",
            f"{name}: fraction of copy bandwidth, P >= 64M fp32 (least over sizes)", gpu)
    fused = next((r for r in steps if r["list"] == "resnet56" and r["method"] == "fused"), {})
    for other, goal in SPEEDUP_GOALS.items():
        out[f"resnet56_fused_speedup_vs_{other}"] = target(
            fused.get(f"speedup_vs_{other}"), goal, ">=",
            f"elementwise part of a SAMPa step on the ResNet-56 list: {other} time / fused time",
            gpu)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kernels, steps = result["kernels"], result["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    names = list(dict.fromkeys(r["kernel"] for r in kernels))
    for i, k in enumerate(names):
        rs = [r for r in kernels if r["kernel"] == k]
        c = f"C{i}"
        axes[0].plot([r["P"] for r in rs], [r["GBps"] for r in rs], "o-", color=c, label=k)
        axes[1].plot([r["P"] for r in rs], [100 * r["fraction_of_copy"] for r in rs], "o-", color=c, label=k)
    ref = [r for r in kernels if r["kernel"] == names[0]] if names else []
    if ref:
        axes[0].plot([r["P"] for r in ref], [r["copy_GBps"] for r in ref], "k--",
                     label=f"copy (bytes of {names[0]})")
    axes[0].set(xscale="log", yscale="log", xlabel="P (fp32 elements)", ylabel="GB/s", title="Fused kernels")
    axes[1].axhline(90, color="k", ls=":", lw=1)
    axes[1].set(xscale="log", xlabel="P (fp32 elements)", ylabel="% of copy bandwidth (same bytes)",
                title="Fraction of a device-to-device copy")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    lists = list(dict.fromkeys(r["list"] for r in steps))
    methods = list(dict.fromkeys(r["method"] for r in steps))
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [next((r["time_s"] * 1e6 for r in steps if r["list"] == name and r["method"] == m), 0)
                for name in lists]
        axes[2].bar([i + j * w for i in range(len(lists))], vals, w, label=m)
    axes[2].set_xticks([i + w * (len(methods) - 1) / 2 for i in range(len(lists))])
    axes[2].set_xticklabels(lists)
    axes[2].set(yscale="log", ylabel="us per step (elementwise part)", title="One SAMPa step")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{result['device_name']}  torch {result['torch']}  triton {result['triton']}"
                 + ("  (Triton interpreter)" if result["interpreter"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_sizes(text: str) -> List[int]:
    try:
        return [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sizes takes numbers separated by commas, like 1e5,1e6,6.4e7; got {text!r}")


# --quick: only what the targets need. P = 64M (the smallest size the bandwidth
# target covers) and the ResNet-56 list; about 4 GB of buffers on a GPU.
QUICK_SIZES = {"cuda": [64_000_000], "cpu": [10_000]}
QUICK_LISTS = {"cuda": ["resnet56"], "cpu": ["tiny"]}
FULL_SIZES = {"cuda": [100_000, 1_000_000, 4_000_000, 16_000_000, 64_000_000, 100_000_000,
                       250_000_000],
              "cpu": [10_000, 100_000]}
FULL_LISTS = {"cuda": ["resnet56", "100m"], "cpu": ["resnet56"]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--quick", action="store_true",
                    help="only what the targets need: P = 64M and the resnet56 list on CUDA "
                         "(P = 1e4 and the tiny list on CPU)")
    ap.add_argument("--sizes", default=None,
                    help="P values for the kernel part (default: 1e5..2.5e8 on CUDA, 1e4,1e5 on CPU)")
    ap.add_argument("--lists", default=None,
                    help="parameter lists for the step part: resnet56,100m,tiny (default: "
                         "resnet56,100m on CUDA, resnet56 on CPU); 'none' to skip")
    ap.add_argument("--methods", default=",".join(STEP_METHODS), help="step methods to time")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None, help="kernel calls per timed repetition")
    ap.add_argument("--block", type=int, default=None, help="elements per program (elementwise kernels)")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the JSON here instead of <out>/<device>-kernels.json "
                         "(the plot goes beside it)")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def plan(args, kind: str) -> dict:
    """Sizes, lists and repetitions for a device kind ("cuda" or "cpu"):
    explicit options first, then --quick's or the full run's defaults."""
    cpu = kind == "cpu"
    sizes = parse_sizes(args.sizes) if args.sizes else list(
        (QUICK_SIZES if args.quick else FULL_SIZES)[kind])
    lists = args.lists.split(",") if args.lists else list((QUICK_LISTS if args.quick else FULL_LISTS)[kind])
    lists = [] if lists == ["none"] else [s for s in lists if s]
    for name in lists:
        param_shapes(name)
    return dict(sizes=sizes, lists=lists,
                methods=[m for m in args.methods.split(",") if m],
                warmup=args.warmup if args.warmup is not None else (1 if cpu else 5),
                reps=args.reps if args.reps is not None else (3 if cpu else 20),
                inner=args.inner if args.inner is not None else (1 if cpu else 5))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)

    dev_text = args.device
    if dev_text is None:
        import torch
        dev_text = "cuda" if torch.cuda.is_available() else "cpu"
    _setup_env("cpu" if dev_text.startswith("cpu") else "cuda")
    import dataclasses

    import torch
    import triton

    from sampa_fused.update.common import default_config

    device = torch.device(dev_text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here; use --device cpu")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    cpu = device.type == "cpu"
    torch.manual_seed(0)
    if cpu:
        torch.set_num_threads(1)      # shared CPUs: threads only add noise at these sizes
    pl = plan(args, "cpu" if cpu else "cuda")
    sizes, lists, methods = pl["sizes"], pl["lists"], pl["methods"]
    warmup, reps, inner = pl["warmup"], pl["reps"], pl["inner"]

    cfg = default_config(device)
    changes = {k: v for k, v in (("block", args.block), ("num_warps", args.num_warps)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    backend = Backend("triton", cfg)

    print(f"device {device} ({device_name(device)}), torch {torch.__version__}, triton {triton.__version__}, "
          f"config {cfg}")
    print("kernels:")
    krows = bench_kernels(device, sizes, backend, warmup, reps, inner)
    print("steps:")
    srows = bench_steps(device, lists, backend, warmup, max(reps, 3), methods=methods)
    # device_name is the device's own name (the JSON convention of the
    # benchmarks); the file name uses the slug of device_name().
    result = dict(device=str(device), device_slug=device_name(device),
                  device_name=torch.cuda.get_device_name(device) if not cpu else "cpu",
                  torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                  python=platform.python_version(), quick=bool(args.quick),
                  interpreter=bool(cpu), config=dataclasses.asdict(cfg),
                  settings=dict(warmup=warmup, reps=reps, inner=inner, rho=RHO, lam=LAM, lr=LR,
                                momentum=MOMENTUM, weight_decay=WD),
                  kernel_passes=KERNEL_PASSES, kernels=krows, steps=srows)
    result["targets"] = targets(krows, srows, gpu=not cpu)
    if args.json:
        path = Path(args.json)
    else:
        path = Path(args.out) / f"{device_name(device)}-kernels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if not args.no_plot:
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    print("targets:")
    for name, t in result["targets"].items():
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"  {name:40s} {v:>8s} (goal {t['cmp']} {t['goal']:g}) {met}")
    return result


if __name__ == "__main__":
    main()
