"""Step time of the distributed engine on CPU (gloo over loopback, 1 thread
per process), small conv net:

  sam_1proc        SAM, serial engine, 1 process, whole batch
  sampa_1proc      SAMPa, serial engine, 1 process (both passes one after the other)
  sampa_2ranks     SAMPa, distributed engine, 2 ranks (x̃-pass on rank 0, y-pass on rank 1)
  sampa_2ranks_no_overlap   the same, gradients sent only after backward
  sam_dp_2ranks    SAM, distributed engine, 2 ranks data-parallel, half batch each
  fwd_bwd_1proc    one forward/backward alone (the single-rank floor)
  fwd_bwd_2ranks   both ranks doing one forward/backward at once, no communication:
                   the parallel floor, which no SAMPa step on 2 ranks can beat
                   (on a 2-core machine the two ranks slow each other down)
  sampa_2ranks_verify1   SAMPa on 2 ranks with a parameter checksum every step
                   (verify_every=1; the default is every 100): the drift checks' cost
  sampa_2ranks_profile   SAMPa on 2 ranks, each stage of the step timed per rank
                   (times not used in ratios: the timers cost a little)

Each configuration runs in fresh processes; rounds interleave the
configurations so that load from other programs on the machine spreads over
all of them. Writes JSON and a bar chart.

    python bench/bench_distributed.py --out bench/results/cpu-distributed.json
    python bench/bench_distributed.py --quick --json /tmp/dist.json   # 1 round, a few steps
    python bench/bench_distributed.py --batches 16,128 --out bench/results/cpu-distributed-sweep.json

--quick runs sam_1proc and sampa_2ranks only, one round of 5 steps after 2
warm-up steps (under 10 s on 2 CPU cores): enough to see that the script works and to
read the target, too few for a stable ratio. The JSON's "targets" holds
{"sampa_2ranks_vs_sam_1proc": {"value", "goal", "cmp", "met"}} (the ratio of
median step times).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --code DIR (set by --baseline for its subprocess): time that checkout's sampa_fused
CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv[:-1] else REPO
sys.path.insert(0, CODE)

CONFIGS = {
    # name: (world size, method, engine, options)
    "sam_1proc": (1, "sam", "serial", {}),
    "sampa_1proc": (1, "sampa", "serial", {}),
    "sampa_2ranks": (2, "sampa", "distributed", {}),
    "sampa_2ranks_no_overlap": (2, "sampa", "distributed", {"overlap": False}),
    "sam_dp_2ranks": (2, "sam", "distributed", {}),
    "fwd_bwd_1proc": (1, "fwd_bwd", None, {}),
    "fwd_bwd_2ranks": (2, "fwd_bwd", None, {}),
    "sampa_2ranks_verify1": (2, "sampa", "distributed", {"verify_every": 1}),
    "sampa_2ranks_profile": (2, "sampa", "distributed", {"profile": True}),
    # what a user of this machine would otherwise run: SAM on all cores
    "sam_1proc_allcores": (1, "sam", "serial", {"threads": "all"}),
}


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _rank(rank, world, init_file, name, args, out_path):
    threads = CONFIGS[name][3].get("threads", 1)
    torch.set_num_threads(os.cpu_count() if threads == "all" else threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    from sampa_fused import SAM, SAMPa
    try:
        _, method, engine, options = CONFIGS[name]
        profile = options.get("profile", False)
        options = {k: v for k, v in options.items() if k not in ("threads", "profile")}
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=120))
        model = make_model(args["width"])
        g = torch.Generator().manual_seed(1)
        n = args["warmup"] + args["steps"]
        data = [(torch.randn(args["batch"], 3, 32, 32, generator=g),
                 torch.randint(0, 10, (args["batch"],), generator=g)) for _ in range(n)]
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05)
        if method == "sampa":
            opt = SAMPa(model, loss_fn, torch.optim.SGD, lam=0.2, engine=engine, **kw, **options)
        elif method == "sam":
            opt = SAM(model, loss_fn, torch.optim.SGD, engine=engine, **kw, **options)
        else:
            opt = None
        waits = []
        if opt is not None and hasattr(opt.engine, "_wait"):
            # the communication backward did not hide: the end-of-pass wait
            inner = opt.engine._wait

            def timed_wait():
                t = time.perf_counter()
                inner()
                waits.append(time.perf_counter() - t)
            opt.engine._wait = timed_wait
        stages = _profile(opt) if profile else None
        times, cpu, per_step = [], [], []
        for i, b in enumerate(data):
            c0 = time.process_time()
            t0 = time.perf_counter()
            if opt is not None:
                opt.step(b)
            else:
                model.zero_grad(set_to_none=False)
                loss_fn(model, b).backward()
            t1 = time.perf_counter()
            c1 = time.process_time()
            if i >= args["warmup"]:
                times.append(t1 - t0)
                cpu.append(c1 - c0)
                if stages is not None:
                    per_step.append(dict(stages, step=t1 - t0, **{"cpu: step": c1 - c0}))
            if stages is not None:
                stages.clear()
        res = {"times": times, "cpu": cpu,
               "wait_ms": statistics.median(waits[-len(times):]) * 1e3 if waits else None}
        if per_step:
            keys = sorted({k for d in per_step for k in d})
            prof = {k: statistics.median(d.get(k, 0.0) for d in per_step) * 1e3 for k in keys}
            prof["other"] = statistics.median(
                d["step"] - sum(v for k, v in d.items() if k != "step" and not k.startswith("cpu"))
                for d in per_step) * 1e3
            prof["cpu: other"] = statistics.median(
                d["cpu: step"] - sum(v for k, v in d.items() if k.startswith("cpu") and k != "cpu: step")
                for d in per_step) * 1e3
            res["profile_ms"] = prof
        if opt is not None:
            res["params"] = sum(p.numel() for p in model.parameters())
            res["stats"] = dict(getattr(opt.engine, "stats", {}))
            res["buckets"] = len(getattr(opt.engine, "_buckets", []))
        if world > 1:
            dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        res = {"error": traceback.format_exc()}
    torch.save(res, f"{out_path}.{rank}")
    os._exit(0)


def _profile(opt) -> dict:
    """Time each stage of a step on this rank (wrapping the optimizer's
    and engine's methods): stage -> seconds in the current step."""
    stages: dict = {}
    eng, upd = opt.engine, opt.update

    def wrap(obj, attr, label):
        inner = getattr(obj, attr, None)
        if inner is None:
            return

        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return inner(*a, **k)
            finally:
                stages[label] = stages.get(label, 0.0) + time.perf_counter() - t
                cpu = f"cpu: {label}"
                stages[cpu] = stages.get(cpu, 0.0) + time.process_time() - c
        setattr(obj, attr, timed)
    for attr in ("sampa_pre", "sam_save", "sam_perturb"):
        wrap(upd, attr, "update: before the passes")
    for attr in ("check", "sampa_post", "sam_post", "finite", "flags"):
        wrap(upd, attr, "update: check and after the exchange")
    wrap(eng.ctx, "run_pass", "forward/backward (bucket sends included)")
    wrap(eng, "_drift", "drift values (batch fingerprint, checksum, hyperparameter digests)")
    wrap(eng, "_send_message", "message send")
    wrap(eng, "_wait", "exchange wait")
    wrap(eng, "_read", "host read of the message")
    wrap(eng, "_check_status", "status and drift checks")
    wrap(eng, "_take_buffers", "model buffers from rank 0")
    wrap(eng, "_check_batch", "batch validation")
    wrap(opt, "_end", "step end (host read of the flags, bookkeeping, held batch)")
    wrap(opt, "_begin", "step begin (hyperparameters, layout checks)")
    return stages


def run_config(name: str, args: dict, ctx) -> dict:
    world = CONFIGS[name][0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "init"), name, args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        for p in procs:
            if p.is_alive():
                p.kill()
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    for r, res in enumerate(ranks):
        if "error" in res:
            raise RuntimeError(f"{name} failed on rank {r}:\n{res['error']}")
    res = dict(ranks[0])                       # ranks step in lockstep: rank 0's wall times
    res["cpu"] = [r["cpu"] for r in ranks]
    res["wait_ms"] = [r["wait_ms"] for r in ranks]
    if "profile_ms" in res:
        res["profile_ms_by_rank"] = [r.get("profile_ms") for r in ranks]
        del res["profile_ms"]
    return res


def summarize(times):
    ms = sorted(t * 1e3 for t in times)
    q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
            "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ms)}


def chart(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = result["configs"]
    names = list(cfg)
    med = [cfg[n]["median_ms"] for n in names]
    lo = [m - cfg[n]["p10_ms"] for n, m in zip(names, med)]
    hi = [cfg[n]["p90_ms"] - m for n, m in zip(names, med)]
    busiest = [max(cfg[n]["cpu_ms_per_step_by_rank"]) for n in names]
    colors = ["#4c72b0" if "sampa" in n else "#999999" if "fwd" in n else "#dd8452" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    sam = cfg["sam_1proc"]["median_ms"]
    sam_cpu = cfg["sam_1proc"]["cpu_ms_per_step_by_rank"][0]
    for ax, vals, ref, err, label in (
            (axes[0], med, sam, [lo, hi], "wall ms per step (median; bars p10-p90)"),
            (axes[1], busiest, sam_cpu, None, "CPU ms per step of the busiest rank (median)")):
        ax.barh(names, vals, xerr=err, color=colors)
        ax.axvline(0.5 * ref, ls=":", c="k", label="0.5 x SAM 1 process (ideal)")
        ax.axvline(0.6 * ref, ls="--", c="r", label="0.6 x SAM 1 process (target)")
        ax.set_xlabel(label)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].invert_yaxis()
    la = result["machine"]["loadavg_start"][0]
    fig.suptitle(f"CPU, gloo loopback, 1 thread/process, batch {result['args']['batch']}, "
                 f"{result['params']} params; {result['machine']['cpus']} cores shared "
                 f"(load average {la:.1f} at start)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


TARGET_RATIO = 0.6      # sampa_2ranks <= 0.6 x sam_1proc (ideal 0.5 + communication)
QUICK = dict(steps=5, warmup=2, rounds=1, configs="sam_1proc,sampa_2ranks")
FULL = dict(steps=20, warmup=5, rounds=5, configs=",".join(CONFIGS))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"sam_1proc and sampa_2ranks, {QUICK['rounds']} round of {QUICK['steps']} steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", default=None, metavar="B1,B2,...",
                    help="a sweep: the run at each batch size, ratios against batch size (JSON + plot)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help=f"default {FULL['steps']}")
    ap.add_argument("--warmup", type=int, default=None, help=f"default {FULL['warmup']}")
    ap.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']}")
    ap.add_argument("--configs", default=None, help="default: all (" + ",".join(CONFIGS) + ")")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cpu-distributed.json"),
                    help="JSON path")
    ap.add_argument("--json", default=None, metavar="PATH", help="JSON path (overrides --out)")
    ap.add_argument("--chart", default=None, help="PNG path (default: next to the JSON)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time sampa_2ranks and sam_dp_2ranks with the sampa_fused of another "
                         "checkout (e.g. /work/main), in the same interleaved rounds "
                         "(configs sampa_2ranks@baseline, sam_dp_2ranks@baseline)")
    ap.add_argument("--replot", default=None, metavar="JSON", help="redraw a sweep's plot from its JSON")
    ap.add_argument("--code", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    return ap


def plan(a) -> dict:
    base = QUICK if a.quick else dict(FULL, configs=SWEEP_CONFIGS) if a.batches else FULL
    pick = lambda k: getattr(a, k) if getattr(a, k) is not None else base[k]  # noqa: E731
    return {k: pick(k) for k in ("steps", "warmup", "rounds", "configs")}


def targets(result: dict) -> dict:
    ratio = result.get("ratios_vs_sam_1proc", {}).get("sampa_2ranks")
    t = {"value": ratio, "goal": TARGET_RATIO, "cmp": "<=",
         "met": None if ratio is None else bool(ratio <= TARGET_RATIO),
         "what": "CPU, gloo: median step time of SAMPa on 2 ranks / SAM in 1 process"}
    if ratio is None:
        t["note"] = "not measured: run both sam_1proc and sampa_2ranks"
    return {"sampa_2ranks_vs_sam_1proc": t}


SWEEP_TARGETS = {   # batch: (SAMPa 2 ranks / the parallel floor, SAMPa 2 ranks / SAM data-parallel 2 ranks)
    16: (1.15, 0.8),
    128: (1.08, 1.0),
}
SWEEP_CONFIGS = ("sam_1proc,sampa_2ranks,sam_dp_2ranks,fwd_bwd_1proc,fwd_bwd_2ranks,"
                 "sampa_2ranks_verify1,sampa_2ranks_profile")


def sweep(a, ap, batches) -> dict:
    """The same run at each batch size; ratios against batch size, targets,
    JSON and a plot."""
    out = a.json or a.out
    per = {}
    for b in batches:
        a.batch = b
        per[b] = run_once(a, ap)
    ratios = {}
    for b, r in per.items():
        c = r["configs"]
        med = {n: c[n]["median_ms"] for n in c}
        ratios[b] = {
            "sampa_2ranks_vs_fwd_bwd_2ranks": med.get("sampa_2ranks", 0) / med["fwd_bwd_2ranks"]
            if "fwd_bwd_2ranks" in med else None,
            "sampa_2ranks_vs_fwd_bwd_1proc": med.get("sampa_2ranks", 0) / med["fwd_bwd_1proc"]
            if "fwd_bwd_1proc" in med else None,
            "fwd_bwd_2ranks_vs_fwd_bwd_1proc": med["fwd_bwd_2ranks"] / med["fwd_bwd_1proc"]
            if "fwd_bwd_2ranks" in med and "fwd_bwd_1proc" in med else None,
            "fwd_bwd_2ranks_vs_sam_dp_2ranks": med["fwd_bwd_2ranks"] / med["sam_dp_2ranks"]
            if "fwd_bwd_2ranks" in med and "sam_dp_2ranks" in med else None,
            "sampa_2ranks_verify1_vs_sampa_2ranks": med["sampa_2ranks_verify1"] / med["sampa_2ranks"]
            if "sampa_2ranks_verify1" in med and "sampa_2ranks" in med else None,
            "sampa_2ranks_vs_sam_dp_2ranks": med.get("sampa_2ranks", 0) / med["sam_dp_2ranks"]
            if "sam_dp_2ranks" in med else None,
            "sampa_2ranks_vs_sam_1proc": r.get("ratios_vs_sam_1proc", {}).get("sampa_2ranks"),
            "sampa_2ranks_vs_sam_1proc_allcores": med.get("sampa_2ranks", 0) / med["sam_1proc_allcores"]
            if "sam_1proc_allcores" in med else None,
            "median_ms": med,
        }
        # CPU time of the busiest rank per step: the work, which contention
        # from other programs inflates less than wall time
        cpu = {n: max(c[n]["cpu_ms_per_step_by_rank"]) for n in c}
        ratios[b]["cpu_ms_busiest_rank"] = cpu
        for num, den in (("sampa_2ranks", "fwd_bwd_2ranks"), ("sampa_2ranks", "sam_dp_2ranks"),
                         ("sampa_2ranks@baseline", "fwd_bwd_2ranks"),
                         ("sampa_2ranks@baseline", "sam_dp_2ranks@baseline"),
                         ("sampa_2ranks", "sampa_2ranks@baseline")):
            if num in med and den in med:
                ratios[b][f"{num}_vs_{den}"] = med[num] / med[den]
                ratios[b][f"cpu_{num}_vs_{den}"] = cpu[num] / cpu[den]
    targets = {}
    for b, (fb, dp) in SWEEP_TARGETS.items():
        if b not in ratios:
            continue
        for key, goal in (("sampa_2ranks_vs_fwd_bwd_2ranks", fb), ("sampa_2ranks_vs_sam_dp_2ranks", dp)):
            v = ratios[b][key]
            targets[f"batch{b}_{key}"] = {"value": v, "goal": goal, "cmp": "<=",
                                         "met": None if v is None else bool(v <= goal)}
    result = {"benchmark": "distributed engine, CPU, batch sweep", "device_name": "cpu",
              "torch": torch.__version__, "batches": batches, "ratios": ratios, "targets": targets,
              "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
                          "loadavg_by_batch": {str(b): r["machine"]["loadavg_start"] for b, r in per.items()},
                          "loadavg_by_round": {str(b): r["machine"]["loadavg_by_round"]
                                               for b, r in per.items()}},
              "profile_ms_by_rank": {str(b): r["configs"].get("sampa_2ranks_profile", {})
                                     .get("profile_ms_by_rank") for b, r in per.items()},
              "command": "python bench/bench_distributed.py " + " ".join(sys.argv[1:]),
              "runs": {str(b): r for b, r in per.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"ratios": {b: {k: v for k, v in r.items() if k not in ("median_ms", "cpu_ms_busiest_rank")}
                                 for b, r in ratios.items()}, "targets": targets}, indent=2))
    sweep_chart(result, a.chart or os.path.splitext(out)[0] + ".png")
    return result


def sweep_chart(result: dict, path: str) -> None:
    """The ratios against batch size, the targets as short bars of the
    same colour (python bench/bench_distributed.py --replot JSON redraws it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ratios = {int(b): r for b, r in result["ratios"].items()}
    batches = sorted(ratios)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines = (("sampa_2ranks_vs_fwd_bwd_2ranks", "SAMPa 2 ranks / parallel floor (2 ranks, 1 fwd-bwd each)", 0),
             ("sampa_2ranks_vs_sam_dp_2ranks", "SAMPa 2 ranks / SAM data-parallel 2 ranks", 1),
             ("sampa_2ranks@baseline_vs_fwd_bwd_2ranks", "baseline SAMPa 2 ranks / parallel floor", 0),
             ("sampa_2ranks@baseline_vs_sam_dp_2ranks@baseline", "baseline SAMPa / baseline SAM-DP", 1),
             ("sampa_2ranks_vs_fwd_bwd_1proc", "SAMPa 2 ranks / one forward-backward", None),
             ("sampa_2ranks_vs_sam_1proc", "SAMPa 2 ranks / SAM 1 process 1 thread", None),
             ("sampa_2ranks_vs_sam_1proc_allcores", "SAMPa 2 ranks / SAM 1 process all cores", None))
    colors = {0: "C0", 1: "C1"}
    extra = iter(["C2", "C3", "C4"])
    for key, label, target in lines:
        xs = [b for b in batches if ratios[b].get(key) is not None]
        if not xs:
            continue
        dashed = "@baseline" in key
        color = colors[target] if target is not None else next(extra)
        ax.plot(xs, [ratios[b][key] for b in xs], marker="o", label=label, color=color,
                ls="--" if dashed else "-", alpha=0.6 if dashed else 1.0)
    ax.axhline(1.0, color="grey", lw=0.8)
    for b, goals in SWEEP_TARGETS.items():
        if b in ratios:
            for goal, target in zip(goals, (0, 1)):
                ax.plot([b], [goal], marker="_", ms=22, mew=3, color=colors[target])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ratio of median step times")
    la = result["machine"]["loadavg_by_batch"]
    ax.set_title("CPU, gloo loopback, 1 thread per process; targets: thick bars (same colour)\n"
                 f"load average {', '.join(f'{v[0]:.1f}' for v in la.values())} at the start of "
                 f"each batch size; {result['machine']['cpus']} cores", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _baseline(name: str, args: dict, code: str) -> dict:
    """One configuration with another checkout's sampa_fused, in a fresh
    interpreter (this one has imported ours)."""
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--code", code, "--run-one", name,
               "--batch", str(args["batch"]), "--width", str(args["width"]), "--steps",
               str(args["steps"]), "--warmup", str(args["warmup"]), "--json", out]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, PYTHONPATH=code))
        if p.returncode != 0:
            raise RuntimeError(f"{name}@baseline failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            sweep_chart(json.load(f), a.chart or os.path.splitext(a.replot)[0] + ".png")
        return None
    if a.run_one:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "sampa_fused"])
        args = {"batch": a.batch, "width": a.width, "steps": a.steps, "warmup": a.warmup}
        res = run_config(a.run_one, args, ctx)
        with open(a.json, "w") as f:
            json.dump({k: res[k] for k in ("times", "cpu", "wait_ms")}, f)
        return res
    if a.batches:
        try:
            batches = [int(b) for b in a.batches.split(",")]
        except ValueError:
            ap.error(f"--batches takes sizes like 8,16,32, got {a.batches!r}")
        return sweep(a, ap, batches)
    result = run_once(a, ap)
    out = a.json or a.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in result
                      if k.startswith(("ratios", "cpu_time", "target", "sampa_2"))}, indent=2))
    if "sam_1proc" in result["configs"]:
        chart(result, a.chart or os.path.splitext(out)[0] + ".png")
    return result


def run_once(a, ap) -> dict:
    pl = plan(a)
    a.rounds = pl["rounds"]
    args = {"batch": a.batch, "width": a.width, "steps": pl["steps"], "warmup": pl["warmup"]}
    names = pl["configs"].split(",")
    if a.baseline:
        names += [f"{n}@baseline" for n in ("sampa_2ranks", "sam_dp_2ranks")]
    for n in names:
        if n.split("@")[0] not in CONFIGS:
            ap.error(f"unknown config {n!r}; choose from {list(CONFIGS)}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "sampa_fused"])
    load0 = os.getloadavg()
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    waits = {n: [] for n in names}
    rounds = {n: [] for n in names}
    extra = {}
    load_rounds = []
    for r in range(a.rounds):
        load_rounds.append(os.getloadavg())
        for n in names[r % len(names):] + names[:r % len(names)]:   # rotate: no fixed position
            res = (_baseline(n.split("@")[0], args, a.baseline) if n.endswith("@baseline")
                   else run_config(n, args, ctx))
            times[n] += res["times"]
            cpu[n].append(res["cpu"])
            waits[n].append(res["wait_ms"])
            rounds[n].append(statistics.median(res["times"]) * 1e3)
            extra[n] = {k: v for k, v in res.items() if k not in ("times", "cpu", "wait_ms")}
            print(f"round {r} {n:26s} {rounds[n][-1]:8.2f} ms", flush=True)
    configs = {}
    for n in names:
        s = summarize(times[n])
        s["round_medians_ms"] = rounds[n]
        s["min_round_median_ms"] = min(rounds[n])
        world = CONFIGS[n.split("@")[0]][0]
        if waits[n] and waits[n][0][0] is not None:
            s["end_of_pass_wait_ms_by_rank"] = [statistics.median(rnd[r] for rnd in waits[n])
                                                for r in range(world)]
        s["cpu_ms_per_step_by_rank"] = [statistics.median(t for rnd in cpu[n] for t in rnd[r]) * 1e3
                                        for r in range(world)]
        s.update(extra[n])
        configs[n] = s
    params = next((c["params"] for c in configs.values() if "params" in c), None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "benchmark": "distributed engine, CPU",
        # the benchmarks' JSON convention: device, versions, targets
        "device_name": "cpu", "triton": triton_version, "cuda": torch.version.cuda,
        "quick": a.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "loadavg_by_round": load_rounds,
                    "note": "wall times; the 2-rank runs need 2 free cores, and this machine's 2 "
                            "cores are shared with other programs (see loadavg): cpu_ms_per_step_rank0 "
                            "is the CPU time rank 0 spent per step (its own work, gloo threads "
                            "included), which contention does not inflate as much"},
        "torch": torch.__version__, "python": platform.python_version(),
        "args": args, "params": params, "configs": configs,
        "bytes_sent_per_rank_per_step": {
            # analytic (fp32): gradients only, plus 8 bytes of losses per pass;
            # model buffers (batch norm) are broadcast from rank 0 once per pass
            "sampa_2ranks": 4 * params if params else None,
            "ddp_allreduce_of_2P_on_2_ranks": 2 * 4 * (2 * params) * (2 - 1) // 2 if params else None,
            "sam_dp_2ranks (two all-reduces of P)": 2 * 2 * 4 * params * (2 - 1) // 2 if params else None,
        },
    }
    if "sam_1proc" in configs:
        sam = configs["sam_1proc"]["median_ms"]
        result["ratios_vs_sam_1proc"] = {n: configs[n]["median_ms"] / sam for n in names}
        # the least disturbed estimate: each configuration's quietest round
        sam_min = configs["sam_1proc"]["min_round_median_ms"]
        result["ratios_vs_sam_1proc_quietest_round"] = {
            n: configs[n]["min_round_median_ms"] / sam_min for n in names}
        # the work per rank, which contention inflates least
        sam_cpu = configs["sam_1proc"]["cpu_ms_per_step_by_rank"][0]
        result["cpu_time_ratios_vs_sam_1proc_max_rank"] = {
            n: max(configs[n]["cpu_ms_per_step_by_rank"]) / sam_cpu for n in names}
        result["target"] = "sampa_2ranks <= 0.6 x sam_1proc (ideal 0.5 + communication)"
        if "sampa_2ranks" in configs:
            result["target_met_median"] = result["ratios_vs_sam_1proc"]["sampa_2ranks"] <= 0.6
            result["target_met_quietest_round"] = \
                result["ratios_vs_sam_1proc_quietest_round"]["sampa_2ranks"] <= 0.6
        # configurations of one round ran back to back, under similar load
        result["per_round_ratios_vs_sam_1proc"] = {
            n: [x / y for x, y in zip(rounds[n], rounds["sam_1proc"])] for n in names}
        if "sampa_2ranks" in configs and "sam_dp_2ranks" in configs:
            result["sampa_2ranks_vs_sam_dp_2ranks"] = (configs["sampa_2ranks"]["median_ms"]
                                                       / configs["sam_dp_2ranks"]["median_ms"])
    result["targets"] = targets(result)
    return result


if __name__ == "__main__":
    main()
