"""Step time and peak GPU memory of one training step:

    sgd                  torch.optim.SGD (eager: forward, backward, step)
    sam                  SAM, serial engine
    sam_graph            SAM, the whole step as a CUDA graph (engine="streams", graph=True)
    sampa_serial         SAMPa, x̃-pass then y-pass on one stream
    sampa_streams        SAMPa, the two passes on two CUDA streams
    sampa_streams_graph  SAMPa, two streams, the whole step as a CUDA graph

on (i) ResNet-56, 32x32x3, batch 128 and (ii) WRN-28-10, 32x32x3, batch 256.
Writes bench/results/<device>-step.json and <device>-step.png.

    python bench/bench_step.py                 # GPU: both models
    python bench/bench_step.py --smoke         # CPU or GPU: tiny models, a few steps
    python bench/bench_step.py --quick --json out.json   # GPU: the targets in ~1 minute

--quick times only what the targets need, with few steps: ResNet-56 at
batch 128, every configuration, 20 steps x 3 repeats; WRN-28-10 at batch 128
(not 256, to stay within the minute) with sampa_serial, sampa_streams and
sampa_streams_graph, 5 steps x 3 repeats. The JSON's "targets" holds each
target as {"value", "goal", "cmp", "met"} (the ratio of two step times).

SGD with momentum 0.9 and weight decay 5e-4 is the base optimizer everywhere;
rho=0.05, lam=0.5. Batches are random tensors already on the device (four
of them, cycled), so the numbers are the optimizer's and the model's, not a
data loader's. Each configuration builds a fresh model; the peak memory is
torch.cuda.max_memory_allocated over its construction, warm-up and timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
try:
    import sampa_fused  # noqa: F401
except ImportError:      # run from a checkout without installing the package
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from models_bench import MODELS, count_params, cross_entropy  # noqa: E402

from sampa_fused import SAM, SAMPa  # noqa: E402

CONFIGS = ("sgd", "sam", "sam_graph", "sampa_serial", "sampa_streams", "sampa_streams_graph")
NEEDS_CUDA = {"sam_graph", "sampa_streams", "sampa_streams_graph"}
BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO, LAM = 0.05, 0.5
# Targets of the issue (an H100), as step-time ratios numerator / denominator
# that must stay at most `limit`: model (i) ResNet-56, model (ii) WRN-28-10.
TARGETS = {
    "resnet56": [("sampa_streams_graph", "sam_graph", 0.6), ("sampa_streams_graph", "sgd", 1.2)],
    "wrn28_10": [("sampa_streams", "sampa_serial", 1.0), ("sampa_streams_graph", "sampa_serial", 1.0)],
}
# --quick: per model, the batch (None: the model's own), the configurations
# (those its targets compare) and the timed steps per repeat.
QUICK = {
    "resnet56": dict(batch=None, configs=CONFIGS, steps=20),
    "wrn28_10": dict(batch=128, configs=("sampa_serial", "sampa_streams", "sampa_streams_graph"),
                     steps=5),
}
QUICK_REPEATS = 3


def result_line(model: str, config: str, r: dict) -> str:
    """One printed line per configuration; peak memory only where measured (CUDA)."""
    if "step_ms" not in r:
        return f"{model:14s} {config:20s} {r}"
    peak = r.get("peak_mem_gib")
    peak = f"peak {peak:.3f} GiB" if peak is not None else "peak memory n/a (not measured on CPU)"
    return f"{model:14s} {config:20s} {r['step_ms']:9.3f} ms/step  {peak}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def make_step(config: str, model: torch.nn.Module, device: torch.device):
    """A closure running one training step on a batch."""
    if config == "sgd":
        opt = torch.optim.SGD(model.parameters(), **BASE)

        def step(batch):
            loss = cross_entropy(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step
    if config.startswith("sam_") or config == "sam":
        kw = dict(engine="streams", graph=True) if config == "sam_graph" else dict(engine="serial")
        opt = SAM(model, cross_entropy, torch.optim.SGD, rho=RHO, **kw, **BASE)
    else:
        kw = {"sampa_serial": dict(engine="serial"),
              "sampa_streams": dict(engine="streams"),
              "sampa_streams_graph": dict(engine="streams", graph=True)}[config]
        opt = SAMPa(model, cross_entropy, torch.optim.SGD, rho=RHO, lam=LAM, **kw, **BASE)
    return opt.step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(config: str, spec, device: torch.device, steps: int, warmup: int, repeats: int) -> Dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = spec.make().to(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [(torch.randn(spec.batch, *spec.input_shape, generator=gen).to(device),
                torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(device))
               for _ in range(4)]
    step = make_step(config, model, device)
    losses = []
    for i in range(warmup):
        losses.append(float(step(batches[i % 4])))
    times = []
    for r in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(batches[i % 4])
        _sync(device)
        times.append((time.perf_counter() - t0) / steps * 1e3)
        losses.append(float(loss))
    out = {"step_ms": statistics.median(times), "step_ms_repeats": times,
           "loss_first": losses[0], "loss_last": losses[-1],
           "finite": all(math.isfinite(v) for v in losses)}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        out["peak_mem_gib"] = None
    opt = getattr(step, "__self__", None)
    whole = getattr(getattr(opt, "engine", None), "graph", None)
    if whole is not None:
        out["graph_captures"], out["graph_replays"] = whole.captures, whole.replays
    del step, model, batches, opt, whole
    return out


def check_targets(results: Dict) -> Dict[str, Dict]:
    """{name: {"value", "goal", "cmp", "met", "what"}} for every target whose
    model was run; value and met are None when a configuration did not run."""
    out = {}
    for name, checks in TARGETS.items():
        if name not in results["models"]:
            continue
        entry = results["models"][name]
        res = entry["configs"]
        for num, den, limit in checks:
            a, b = res.get(num, {}).get("step_ms"), res.get(den, {}).get("step_ms")
            ratio = a / b if a and b else None
            t = {"value": ratio, "goal": limit, "cmp": "<=",
                 "met": None if ratio is None else bool(ratio <= limit),
                 "what": f"{name} batch {entry['batch']}: step time {num} / {den}"}
            if ratio is None:
                why = [f"{c}: {res[c].get('error') or res[c].get('skipped')}" for c in (num, den)
                       if c in res and "step_ms" not in res[c]]
                t["note"] = "not measured" + (f" ({'; '.join(why)})" if why else "")
            out[f"{name}_{num}_vs_{den}"] = t
    return out


def plot(results: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 7.5), squeeze=False)
    colors = ["#777777", "#4c72b0", "#55a0fb", "#dd8452", "#c44e52", "#8c1c13"]
    for col, name in enumerate(names):
        res = results["models"][name]["configs"]
        for row, (key, label) in enumerate((("step_ms", "step time (ms)"),
                                            ("peak_mem_gib", "peak memory (GiB)"))):
            ax = axes[row][col]
            vals = [res.get(c, {}).get(key) for c in CONFIGS]
            xs = range(len(CONFIGS))
            ax.bar(xs, [v or 0 for v in vals], color=colors)
            for x, v in zip(xs, vals):
                ax.text(x, v or 0, "n/a" if v is None else f"{v:.3g}", ha="center", va="bottom",
                        fontsize=8)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(CONFIGS, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(results["models"][name]["note"], fontsize=9)
    fig.suptitle(f"sampa-fused: one training step on {results['device']} "
                 f"(torch {results['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models and few steps (CPU allowed)")
    p.add_argument("--quick", action="store_true",
                   help="GPU: only what the targets need, few steps (see above)")
    p.add_argument("--models", default=None, help="comma-separated, from " + ", ".join(MODELS))
    p.add_argument("--configs", default=None,
                   help="comma-separated, from " + ", ".join(CONFIGS) + " (default: all; with "
                        "--quick, those each model's targets need)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first; graph configurations capture after the engine's "
                        "warmup_steps eager steps (3 by default), so keep this above that")
    p.add_argument("--repeats", type=int, default=None, help=f"default 3 ({QUICK_REPEATS} with --quick)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the JSON here instead of <out>/<device>-step.json (the plot goes beside it)")
    return p


def plan(args, p: argparse.ArgumentParser, device_type: str) -> Dict:
    """What to run: [(model, spec, configs, steps)], warmup and repeats."""
    if device_type != "cuda" and not args.smoke:
        p.error("without CUDA only a smoke run makes sense: pass --smoke"
                + (" (--quick measures the GPU targets)" if args.quick else ""))
    if args.smoke and args.quick:
        p.error("--smoke and --quick exclude each other: --smoke runs tiny models, --quick the "
                "target models")
    models = (args.models.split(",") if args.models else
              (["resnet8_tiny", "wrn10_1_tiny"] if args.smoke else
               list(QUICK) if args.quick else ["resnet56", "wrn28_10"]))
    chosen = [c for c in args.configs.split(",") if c] if args.configs else None
    for c in chosen or ():
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    runs = []
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        spec = MODELS[m]
        quick = QUICK.get(m, {}) if args.quick else {}
        if quick.get("batch"):
            spec = dataclasses.replace(spec, batch=quick["batch"])
        configs = chosen or list(quick.get("configs", CONFIGS))
        steps = args.steps or quick.get("steps") or (
            3 if args.smoke else (50 if spec.batch <= 128 else 20))
        runs.append((m, spec, configs, steps))
    warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 8)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else 3)
    return {"runs": runs, "warmup": warmup, "repeats": repeats}


def main(argv: Optional[List[str]] = None) -> Dict:
    p = build_parser()
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pl = plan(args, p, device.type)
    warmup, repeats = pl["warmup"], pl["repeats"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results = {"device": device_name(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "smoke": args.smoke, "quick": args.quick,
               "base": dict(BASE, optimizer="SGD"), "rho": RHO, "lam": LAM,
               "warmup": warmup, "repeats": repeats, "models": {}}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    for m, spec, configs, steps in pl["runs"]:
        note = spec.note
        if spec.batch != MODELS[m].batch:
            note += f" [run at batch {spec.batch}]"
        entry = {"note": note, "params": count_params(spec.make()), "batch": spec.batch,
                 "input_shape": list(spec.input_shape), "steps": steps, "configs": {}}
        results["models"][m] = entry
        for c in configs:
            if c in NEEDS_CUDA and device.type != "cuda":
                entry["configs"][c] = {"skipped": "needs CUDA"}
                continue
            try:
                entry["configs"][c] = run_config(c, spec, device, steps, warmup, repeats)
            except Exception as e:   # one failing configuration (say, out of memory) is a result too
                entry["configs"][c] = {"error": f"{type(e).__name__}: {e}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            r = entry["configs"][c]
            print(result_line(m, c, r), flush=True)
    results["targets"] = check_targets(results)
    for name, t in results["targets"].items():
        print(f"target {name}: {t['what']} = "
              f"{'n/a' if t['value'] is None else format(t['value'], '.3f')} (goal {t['cmp']} {t['goal']}) "
              f"-> {'met' if t['met'] else 'NOT met' if t['met'] is not None else 'n/a'}")
    if args.json:
        path = Path(args.json)
    else:
        path = Path(args.out) / (f"{results['device']}-step" + ("-smoke" if args.smoke else "")
                                 + ("-quick" if args.quick else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
