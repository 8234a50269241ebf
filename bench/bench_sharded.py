"""Per-rank memory and step time on 4 ranks (gloo over loopback, 1 thread per
process), an MLP of 21.6M parameters (10 layers of 1536):

  sampa_sharded      ShardedSAMPa on a (pass, shard) = (2, 2) mesh: half 0 the
                     x̃-pass, half 1 the y-pass, each FSDP2-sharded over 2 ranks
  sampa_replicated   SAMPa, engine="distributed": every rank keeps the whole x,
                     base state and gy (2 data-parallel ranks per half)
  sam_sharded        ShardedSAM: SAM data-parallel over the 4 ranks on the same
                     sharding (the FSDP2 baseline)

Batch: `--batch` samples per half (SAMPa: each half's ranks take batch/2;
SAM: each of the 4 ranks batch/4 of the same global batch). Memory per rank:
the bytes of every live tensor storage in the process after the timed steps
(parameters' local shards, gradients, the optimizer's buffers, the batches;
each storage once), and the peak resident set (ru_maxrss) minus the one
before the model was built. Rounds interleave the configurations; step ratios are taken per round
(the configurations of a round ran back to back) and their median reported.

    python bench/bench_sharded.py --out bench/results/cpu-sharded.json
    python bench/bench_sharded.py --quick --json /tmp/sharded.json   # tiny model, 1 round
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sampa_fused.launch import free_port  # noqa: E402  (after the path)

CONFIGS = ("sampa_sharded", "sampa_replicated", "sam_sharded")
WORLD = 4


def make_model(width: int, depth: int, d_in: int = 256, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    from torch.distributed.tensor import DTensor
    seen, total = set(), 0
    with warnings.catch_warnings():           # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objs:
        try:
            if isinstance(obj, DTensor):
                continue
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += st.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (meta, wrappers)
            continue
    return total


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_main(rank: int, port: str, name: str, args: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    import sampa_fused
    from sampa_fused import SAMPa
    res = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
        rss0 = rss_bytes()
        model = make_model(args["width"], args["depth"])
        n_params = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(1)
        n = args["warmup"] + args["steps"]
        data = [(torch.randn(args["batch"], 256, generator=g), torch.randint(0, 10, (args["batch"],), generator=g))
                for _ in range(n)]
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05)
        if name == "sampa_sharded":
            opt = sampa_fused.ShardedSAMPa(sampa_fused.shard(model), loss_fn, torch.optim.SGD, lam=0.2, **kw)
        elif name == "sam_sharded":
            opt = sampa_fused.ShardedSAM(sampa_fused.shard(model), loss_fn, torch.optim.SGD, **kw)
        else:
            opt = SAMPa(model, loss_fn, torch.optim.SGD, lam=0.2, engine="distributed", **kw)
        times = []
        for i, b in enumerate(data):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step(b)
            t1 = time.perf_counter()
            if i >= args["warmup"]:
                times.append(t1 - t0)
        gc.collect()
        res = {"times": times, "params": n_params, "tensor_bytes": live_tensor_bytes(),
               "peak_rss_delta": rss_bytes() - rss0}
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        res = {"error": traceback.format_exc()}
    torch.save(res, f"{out_path}.{rank}")
    os._exit(0)



def run_config(name: str, args: dict) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank", str(r), "--port", port,
                                   "--config", name, "--args", json.dumps(args), "--res", out], env=env)
                 for r in range(WORLD)]
        for p in procs:
            p.wait(timeout=600)
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(ranks):
        if "error" in res:
            raise RuntimeError(f"{name}, rank {r}:\n{res['error']}")
    return ranks


def chart(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = result["configs"]
    names = list(cfg)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = ["#4c72b0" if n == "sampa_sharded" else "#dd8452" if n == "sam_sharded" else "#999999"
              for n in names]
    axes[0].barh(names, [cfg[n]["median_ms"] for n in names], color=colors)
    axes[0].set_xlabel("wall ms per step (median over rounds and ranks' slowest)")
    axes[1].barh(names, [max(cfg[n]["tensor_mib_by_rank"]) for n in names], color=colors)
    axes[1].set_xlabel("live tensor MiB per rank (max over ranks)")
    for ax in axes:
        ax.invert_yaxis()
    la = result["machine"]["loadavg_start"][0]
    fig.suptitle(f"CPU, gloo loopback, 4 ranks x 1 thread, {result['params'] / 1e6:.1f}M params, batch "
                 f"{result['args']['batch']} per half; load average {la:.1f} at start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


QUICK = dict(width=64, depth=2, steps=3, warmup=1, rounds=1)
FULL = dict(width=1536, depth=10, steps=6, warmup=2, rounds=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round: the script works")
    ap.add_argument("--batch", type=int, default=32, help="samples per half (default 32: 16 per rank)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cpu-sharded.json"))
    ap.add_argument("--json", default=None, help="JSON path (overrides --out)")
    ap.add_argument("--no-chart", action="store_true")
    # one rank (internal)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--res", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank is not None:
        rank_main(a.rank, a.port, a.config, json.loads(a.args), a.res)
        return
    base = QUICK if a.quick else FULL
    args = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    args["batch"] = a.batch
    names = [n for n in a.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"unknown config {n!r}: choose from {CONFIGS}")
    load0 = os.getloadavg()
    per = {n: [] for n in names}
    for _ in range(args["rounds"]):
        for n in names:                                  # interleaved rounds
            per[n].append(run_config(n, args))
    configs, params = {}, None
    for n, rounds in per.items():
        # a step ends when its slowest rank is done: the max over ranks, per step
        steps = [max(r["times"][i] for r in ranks) for ranks in rounds for i in range(len(ranks[0]["times"]))]
        last = rounds[-1]
        params = last[0]["params"]
        by_round = [statistics.median(max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"])))
                    for ranks in rounds]
        configs[n] = {"median_ms": statistics.median(steps) * 1e3, "n": len(steps),
                      "round_median_ms": [t * 1e3 for t in by_round],
                      "tensor_mib_by_rank": [r["tensor_bytes"] / 2 ** 20 for r in last],
                      "peak_rss_delta_mib_by_rank": [r["peak_rss_delta"] / 2 ** 20 for r in last]}
    result = {"args": args, "params": params, "configs": configs,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "loadavg_start": load0, "loadavg_end": os.getloadavg()}}
    c = configs
    ratios = {}
    if "sampa_sharded" in c and "sampa_replicated" in c:
        ratios["memory_sharded_vs_replicated"] = (max(c["sampa_sharded"]["tensor_mib_by_rank"])
                                                  / max(c["sampa_replicated"]["tensor_mib_by_rank"]))
    if "sampa_sharded" in c and "sam_sharded" in c:
        # per round (the configurations of a round ran back to back, under similar load), then the median
        ratios["step_sampa_sharded_vs_sam_sharded"] = statistics.median(
            a / b for a, b in zip(c["sampa_sharded"]["round_median_ms"], c["sam_sharded"]["round_median_ms"]))
    if "sampa_sharded" in c and "sampa_replicated" in c:
        ratios["step_sampa_sharded_vs_replicated"] = statistics.median(
            a / b for a, b in zip(c["sampa_sharded"]["round_median_ms"], c["sampa_replicated"]["round_median_ms"]))
    result["ratios"] = ratios
    path = a.json or a.out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for n, v in configs.items():
        print(f"{n:18s} {v['median_ms']:9.1f} ms/step   tensors {max(v['tensor_mib_by_rank']):8.1f} MiB/rank   "
              f"peak rss +{max(v['peak_rss_delta_mib_by_rank']):8.1f} MiB/rank")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if not a.no_chart:
        try:
            chart(result, os.path.splitext(path)[0] + ".png")
        except ImportError:
            print("matplotlib is not installed: no chart")


if __name__ == "__main__":
    main()
