"""Memory of an optimizer, in bytes per parameter over the model itself.

A 20M-parameter fp32 MLP (5 layers of 2000 x 2000), SGD with momentum 0.9,
a batch of 8; each optimizer in a fresh process (so nothing one leaves
behind counts for the next), with MALLOC_MMAP_THRESHOLD_=131072 so that
large buffers go back to the OS when freed and RSS follows what is alive.

    baseline  RSS with the model, the batch, and the one-time costs paid: a
              forward/backward of the model (gradients then dropped) and a
              throwaway torch optimizer's step on a tiny tensor (the first
              torch optimizer imports torch._dynamo, about 165 MB)
    steady    RSS between steps, after `--steps` steps, minus the baseline
    peak      the high-water mark (VmHWM, reset by writing 5 to
              /proc/self/clear_refs just before) of one more step, minus
              the baseline

Optimizers (SGD momentum 0.9, lr 0.01; rho 0.05, lam 0.2):
    torch-sgd     torch.optim.SGD: zero_grad, backward, step
    davda54-sam   davda54/sam's SAM, written out below as its algorithm is
                  (per tensor: first_step keeps p.data's copy in the state and
                  adds e_w = rho g/||g|| in place; second_step puts the copy
                  back as p.data and steps the base optimizer), with its
                  recipe's zero_grad between the passes
    sam-<engine>  our SAM on that engine
    sampa-<engine> our SAMPa on that engine
Engines: those that run on this machine's CPU: serial, and distributed with
2 ranks (gloo, one process each; every rank measured, the process group
set up before the baseline).

    python bench/bench_memory.py                       # the table, JSON into bench/results
    python bench/bench_memory.py --params 2e6 --out /tmp/m.json   # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "cpu-memory.json"
CONFIGS = ("torch-sgd", "davda54-sam", "sam-serial", "sampa-serial", "sam-distributed",
           "sampa-distributed")
DISTRIBUTED_RANKS = 2            # gloo on 127.0.0.1, one process per rank
LR, MOMENTUM, RHO, LAM, BATCH = 0.01, 0.9, 0.05, 0.2, 8
MMAP_THRESHOLD = "131072"


# ------------------------------------------------------------------ the reference
def davda54_sam(torch):
    """davda54/sam's SAM (github.com/davda54/sam, sam.py), its algorithm
    written out: a per-tensor loop, the base optimizer over the same groups."""

    class DavdaSAM(torch.optim.Optimizer):
        def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
            super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
            self.param_groups = self.base_optimizer.param_groups
            self.defaults.update(self.base_optimizer.defaults)

        @torch.no_grad()
        def first_step(self, zero_grad=False):
            grad_norm = self._grad_norm()
            for group in self.param_groups:
                scale = group["rho"] / (grad_norm + 1e-12)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    self.state[p]["old_p"] = p.data.clone()
                    e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                    p.add_(e_w)
            if zero_grad:
                self.zero_grad()

        @torch.no_grad()
        def second_step(self, zero_grad=False):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    p.data = self.state[p]["old_p"]
            self.base_optimizer.step()
            if zero_grad:
                self.zero_grad()

        def _grad_norm(self):
            dev = self.param_groups[0]["params"][0].device
            return torch.norm(torch.stack([
                ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(dev)
                for group in self.param_groups for p in group["params"] if p.grad is not None]), p=2)

    return DavdaSAM


# ------------------------------------------------------------------ one process
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(name: str, n_params: float, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = 2000
    layers = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    P = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, width, generator=g), torch.randint(0, width, (BATCH,), generator=g))
               for _ in range(steps + 2)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    # one-time costs, outside the baseline
    if name.endswith("distributed"):
        import torch.distributed as dist
        dist.init_process_group("gloo")
        dist.barrier()
    loss_fn(model, batches[0]).backward()
    for p in model.parameters():
        p.grad = None
    tiny = torch.nn.Parameter(torch.zeros(4))
    tiny.grad = torch.zeros(4)
    torch.optim.SGD([tiny], lr=0.1, momentum=0.9).step()
    del tiny
    base = _status("VmRSS")

    if name == "torch-sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step(b):
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()
    elif name == "davda54-sam":
        opt = davda54_sam(torch)(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

        def step(b):
            loss_fn(model, b).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model, b).backward()
            opt.second_step(zero_grad=True)
    else:
        from sampa_fused import SAM, SAMPa
        method, engine = name.split("-", 1)
        if method == "sam":
            opt = SAM(model, loss_fn, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, engine=engine)
        else:
            opt = SAMPa(model, loss_fn, torch.optim.SGD, rho=RHO, lam=LAM, lr=LR, momentum=MOMENTUM,
                        engine=engine)

        def step(b):
            opt.step(b)
    for b in batches[:steps]:
        step(b)
    steady = _status("VmRSS")
    _reset_peak()
    step(batches[steps])
    peak = _status("VmHWM")
    if name.endswith("distributed"):
        name = f"{name} rank {opt.engine.rank} ({opt.engine.role})"
    return dict(name=name, params=P, baseline_bytes=base, steady_bytes=steady - base,
                peak_bytes=peak - base, steady_per_param=(steady - base) / P,
                peak_per_param=(peak - base) / P)


# ------------------------------------------------------------------ driver
def run(configs, n_params: float, steps: int) -> list:
    sys.path.insert(0, str(ROOT))     # the shared rank launcher
    from sampa_fused.launch import start_ranks
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for name in configs:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", name,
                "--params", str(n_params), "--steps", str(steps)]
        if not name.endswith("distributed"):
            procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        else:
            procs = start_ranks(argv, DISTRIBUTED_RANKS, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = [p.communicate() for p in procs]
        for p, (out, err) in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def table(rows) -> str:
    ref = {r["name"]: r for r in rows}.get("davda54-sam")
    lines = ["| optimizer | steady, between steps | peak, during a step |", "|---|---|---|"]
    for r in rows:
        s, p = r["steady_per_param"], r["peak_per_param"]
        if ref is not None and r["name"] not in ("torch-sgd", "davda54-sam"):
            cell = (f"{s:.1f} ({s - ref['steady_per_param']:+.1f})", f"{p:.1f} ({p - ref['peak_per_param']:+.1f})")
        else:
            cell = (f"{s:.1f}", f"{p:.1f}")
        lines.append(f"| {r['name']} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=20e6, help="model size (parameters)")
    ap.add_argument("--steps", type=int, default=3, help="steps before the steady reading")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.params, a.steps)))
        return 0
    configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {CONFIGS}")
    load0 = os.getloadavg()
    t0 = time.time()
    rows = run(configs, a.params, a.steps)
    import torch
    result = dict(benchmark="bench_memory", unit="bytes per parameter over the model (RSS)",
                  rows=rows, steps=a.steps, batch=BATCH, mmap_threshold=int(MMAP_THRESHOLD),
                  loadavg_before=load0, loadavg_after=os.getloadavg(), seconds=time.time() - t0,
                  torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                  targets={"sam": "steady <= davda54 + 8.5, peak <= davda54 + 1",
                           "sampa-serial": "steady <= davda54 + 16.5, peak <= davda54 + 8"})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"(bytes per parameter over the model; {rows[0]['params']} parameters; load "
          f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f}; written to {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
