"""The CPU step where the update matters: many small tensors, short passes.

ResNet-56 for CIFAR (167 parameter tensors, 0.85M parameters), 32x32x3
inputs, batch 2, 1 thread, SGD momentum 0.9 with weight decay 5e-4, rho
0.05, lam 0.2. Side by side in one process, rounds interleaved, medians:

    passes        two forward/backward passes and zero_grad, no update: the floor
    davda54-sam   davda54/sam's SAM (bench_memory.davda54_sam, its algorithm
                  written out: a Python loop over tensors) around the two passes
    sam           our SAM (engine serial, backend torch)
    sampa         our SAMPa (engine serial, backend torch)

Each optimizer has its own copy of the same model. A step time is the median
of `--steps` back-to-back steps; the result is the median over `--rounds`
rounds. The update's share is a step minus `passes`. Targets (issue 22): SAM
<= 1.0x and SAMPa <= 1.05x davda54/sam's step.

    python bench/bench_cpu_update.py                      # JSON into bench/results
    python bench/bench_cpu_update.py --rounds 2 --steps 3 --out /tmp/u.json   # quick
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_memory import davda54_sam  # noqa: E402
from models_bench import MODELS  # noqa: E402

from sampa_fused import SAM, SAMPa  # noqa: E402

DEFAULT_OUT = HERE / "results" / "cpu-update-resnet56.json"
LR, MOMENTUM, WD, RHO, LAM = 0.05, 0.9, 5e-4, 0.05, 0.2
CONFIGS = ("passes", "davda54-sam", "sam", "sampa")
TARGETS = {"sam": 1.0, "sampa": 1.05}


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def make_steppers(model, batch):
    """One step function per configuration, each on its own copy of `model`."""
    out = {}
    m = copy.deepcopy(model)

    def passes():
        for _ in range(2):
            for p in m.parameters():
                p.grad = None
            loss_fn(m, batch).backward()
    out["passes"] = passes

    md = copy.deepcopy(model)
    dsam = davda54_sam(torch)(md.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                              weight_decay=WD)

    def davda():
        loss_fn(md, batch).backward()
        dsam.first_step(zero_grad=True)
        loss_fn(md, batch).backward()
        dsam.second_step(zero_grad=True)
    out["davda54-sam"] = davda

    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, rho=RHO, engine="serial", backend="torch")
    sam = SAM(copy.deepcopy(model), loss_fn, torch.optim.SGD, **kw)
    sampa = SAMPa(copy.deepcopy(model), loss_fn, torch.optim.SGD, lam=LAM, **kw)
    out["sam"] = lambda: sam.step(batch)
    out["sampa"] = lambda: sampa.step(batch)
    return out


def median_step(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", default="resnet56", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = MODELS[a.model]
    model = spec.make()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(a.batch, *spec.input_shape, generator=g),
             torch.randint(0, spec.classes, (a.batch,), generator=g))
    steppers = make_steppers(model, batch)
    for fn in steppers.values():          # warm-up: lazy state, allocator, first step
        for _ in range(2):
            fn()
    load0 = os.getloadavg()
    rounds = {k: [] for k in CONFIGS}
    for r in range(a.rounds):
        order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
        for k in order:
            rounds[k].append(median_step(steppers[k], a.steps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ref = med["davda54-sam"]
    ratios = {k: med[k] / ref for k in ("sam", "sampa")}
    update_ms = {k: 1e3 * (med[k] - med["passes"]) for k in ("davda54-sam", "sam", "sampa")}
    result = dict(benchmark="bench_cpu_update", model=a.model,
                  tensors=sum(1 for _ in model.parameters()),
                  params=sum(p.numel() for p in model.parameters()), batch=a.batch, threads=1,
                  rounds=a.rounds, steps=a.steps, seconds_per_step=med, rounds_seconds=rounds,
                  ratio_to_davda54=ratios, update_ms=update_ms, targets=TARGETS,
                  met={k: ratios[k] <= TARGETS[k] for k in TARGETS},
                  loadavg_before=load0, loadavg_after=os.getloadavg(), torch=torch.__version__,
                  python=platform.python_version(), machine=platform.machine())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for k in CONFIGS:
        extra = f"  {ratios[k]:.3f}x davda54 (target {TARGETS[k]})" if k in ratios else ""
        upd = f"  update {update_ms[k]:6.2f} ms" if k in update_ms else ""
        print(f"{k:12s} {1e3 * med[k]:7.2f} ms{upd}{extra}")
    print(f"load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
