"""Communication benchmark of the peer engine, in the manner of nccl-tests.

Part 1, copies between two devices, sizes 4 KB .. 1 GB (powers of two),
unidirectional (A -> B) and bidirectional (A -> B and B -> A at once):

    link      the extension's PeerLink.copy + finish (cudaMemcpyPeerAsync on a
              dedicated copy stream, ordered by events; what the engine runs)
    memcpy    one plain cudaMemcpyAsync / cudaMemcpyPeerAsync per copy
              (the extension's memcpy_async): the reference for the link
    copy_     Tensor.copy_ across devices
    sendrecv  torch.distributed send/recv (NCCL, one process per GPU: needs
              two GPUs; NCCL refuses two ranks on one GPU)

time is per copy (both directions together when bidirectional), algbw = bytes
per direction / time, busbw = bytes over all directions / time (GB/s = 1e9 B/s).

Part 2, the exposed communication of a peer-engine step (ResNet-56, batch 128,
SGD): step time with overlap (buckets sent during backward), without overlap
(whole buffers after backward) and with no exchange at all; exposed =
(time - time without exchange) / time without exchange.

On one GPU both devices are cuda:0: copies are device-to-device and the two
passes share the GPU (two streams). Targets: link >= 90% of memcpy (busbw at
the largest sizes), exposed communication with overlap <= 5%.

    python bench/bench_comm.py                       # GPU: everything
    python bench/bench_comm.py --max-size 64M --steps 10
    python bench/bench_comm.py --cpu                 # no GPU: copy_ in host memory
                                                     # and gloo send/recv (2 processes)

Writes bench/results/<device-name>-comm.json and .png (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
try:
    import sampa_fused  # noqa: F401
except ImportError:      # run from a checkout without installing the package
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GB = 1e9
TARGET_LINK_VS_MEMCPY = 0.90
TARGET_EXPOSED = 0.05


# ---------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4K, 64M, 1G)")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def sizes_between(lo: int, hi: int) -> List[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def iterations(nbytes: int, budget_bytes: float = 8e9) -> int:
    """Enough copies that small sizes are not all launch noise, few for large."""
    return int(max(5, min(200, budget_bytes // max(nbytes, 1))))


def device_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def row(method: str, direction: str, nbytes: int, seconds: float, **extra) -> Dict:
    ndir = 2 if direction == "bi" else 1
    return dict(method=method, direction=direction, bytes=nbytes, time_us=seconds * 1e6,
                algbw_GBps=nbytes / seconds / GB, busbw_GBps=ndir * nbytes / seconds / GB, **extra)


def time_cuda(fn: Callable[[], None], iters: int, warmup: int = 3) -> float:
    """Seconds per call of `fn`, which must leave all its work ordered before
    the current stream (CUDA events on the current stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


# ---------------------------------------------------------------- part 1, GPU
def copy_benchmarks(ext, a: torch.device, b: torch.device, sizes: List[int],
                    log: Callable[[str], None]) -> List[Dict]:
    rows = []
    ab_streams = (torch.cuda.Stream(a, priority=-1), torch.cuda.Stream(b, priority=-1))
    ba_streams = (torch.cuda.Stream(b, priority=-1), torch.cuda.Stream(a, priority=-1))
    link_ab = ext.PeerLink(a.index, b.index, ab_streams[0].cuda_stream, ab_streams[1].cuda_stream,
                           False, 8 << 20)
    link_ba = ext.PeerLink(b.index, a.index, ba_streams[0].cuda_stream, ba_streams[1].cuda_stream,
                           False, 8 << 20)
    side_a, side_b = torch.cuda.Stream(a), torch.cuda.Stream(b)   # for concurrent baselines
    cur_a = torch.cuda.current_stream(a)
    for nbytes in sizes:
        n = nbytes // 4
        src_a, dst_b = torch.randn(n, device=a), torch.empty(n, device=b)
        src_b, dst_a = torch.randn(n, device=b), torch.empty(n, device=a)
        iters = iterations(nbytes)

        def fork():
            side_a.wait_stream(cur_a)
            side_b.wait_stream(cur_a)

        def join():
            cur_a.wait_stream(side_a)
            cur_a.wait_stream(side_b)

        def link_uni():
            link_ab.copy(dst_b, src_a, 0, n, -1)
            link_ab.finish(-1, -1)

        def link_bi():
            torch.cuda.current_stream(b).wait_stream(cur_a)   # B's copy starts after `start`
            link_ab.copy(dst_b, src_a, 0, n, -1)
            link_ba.copy(dst_a, src_b, 0, n, -1)
            link_ab.finish(-1, -1)
            link_ba.finish(-1, -1)
            cur_a.wait_stream(torch.cuda.current_stream(b))

        def memcpy_uni():
            ext.memcpy_async(dst_b, src_a, cur_a.cuda_stream)

        def memcpy_bi():
            fork()
            ext.memcpy_async(dst_b, src_a, side_a.cuda_stream)
            ext.memcpy_async(dst_a, src_b, side_b.cuda_stream)
            join()

        def copy_uni():
            dst_b.copy_(src_a, non_blocking=True)

        def copy_bi():
            fork()
            with torch.cuda.stream(side_a):
                dst_b.copy_(src_a, non_blocking=True)
            with torch.cuda.stream(side_b):
                dst_a.copy_(src_b, non_blocking=True)
            join()

        for method, direction, fn in (("link", "uni", link_uni), ("memcpy", "uni", memcpy_uni),
                                      ("copy_", "uni", copy_uni), ("link", "bi", link_bi),
                                      ("memcpy", "bi", memcpy_bi), ("copy_", "bi", copy_bi)):
            with torch.cuda.device(a):
                t = time_cuda(fn, iters)
            rows.append(row(method, direction, nbytes, t, iters=iters))
            # the copy really happened
            if method == "link" and nbytes == sizes[0]:
                torch.cuda.synchronize()
                assert torch.equal(dst_b.cpu(), src_a.cpu()), "link copy produced wrong data"
        log(f"{nbytes:>12,d} B  " + "  ".join(
            f"{r['method']}/{r['direction']} {r['busbw_GBps']:8.1f}" for r in rows[-6:]) + " GB/s")
        del src_a, dst_b, src_b, dst_a
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, backend: str, port: int, sizes: List[int], out: str) -> None:
    """One of two ranks: send/recv each size, uni (0 -> 1) and bi (both ways)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    peer = 1 - rank
    rows = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        for nbytes in sizes:
            n = nbytes // 4
            send, recv = torch.randn(n, device=device), torch.empty(n, device=device)
            iters = iterations(nbytes, 2e9 if cuda else 2e8)
            for direction in ("uni", "bi"):
                def once():
                    if direction == "uni":
                        (dist.send(send, peer) if rank == 0 else dist.recv(recv, peer))
                    else:
                        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
                        for w in dist.batch_isend_irecv(ops):
                            w.wait()
                for _ in range(3):
                    once()
                sync()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    once()
                sync()
                dist.barrier()
                t = (time.perf_counter() - t0) / iters
                rows.append(row("sendrecv", direction, nbytes, t, iters=iters, backend=backend))
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def sendrecv_benchmarks(backend: str, sizes: List[int], log) -> List[Dict]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_dist_worker, args=(backend, _free_port(), sizes, out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    for r in rows:
        log(f"sendrecv/{r['direction']} {r['bytes']:>12,d} B  {r['busbw_GBps']:8.2f} GB/s")
    return rows


def cpu_copy_benchmarks(sizes: List[int], log) -> List[Dict]:
    """Tensor.copy_ in host memory (what a staged copy's host side costs)."""
    rows = []
    for nbytes in sizes:
        n = nbytes // 4
        src, dst = torch.randn(n), torch.empty(n)
        iters = iterations(nbytes, 2e8)
        for _ in range(3):
            dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        t = (time.perf_counter() - t0) / iters
        rows.append(row("copy_", "uni", nbytes, t, iters=iters))
        log(f"copy_/uni {nbytes:>12,d} B  {rows[-1]['busbw_GBps']:8.2f} GB/s")
    return rows


# ---------------------------------------------------------------- part 2, a step
def peer_step_benchmark(pair, model_name: str, steps: int, warmup: int, log) -> Dict:
    from models_bench import MODELS, count_params, cross_entropy
    from sampa_fused import SAMPa
    spec = MODELS[model_name]
    a = torch.device(pair[0])
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(spec.batch, *spec.input_shape, generator=gen).to(a),
             torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(a)) for _ in range(4)]
    kw = dict(rho=0.05, lam=0.5, lr=0.05, momentum=0.9, weight_decay=5e-4)
    variants = {"overlap": dict(engine="peer", devices=pair, overlap=True),
                "no_overlap": dict(engine="peer", devices=pair, overlap=False),
                "no_exchange": dict(engine="peer", devices=pair),
                "serial": dict(engine="serial")}
    out = {"model": model_name, "params": None, "batch": spec.batch, "steps": steps,
           "devices": list(pair), "variants": {}}
    for name, engine_kw in variants.items():
        torch.manual_seed(0)
        model = spec.make().to(a)
        out["params"] = count_params(model)
        opt = SAMPa(model, cross_entropy, torch.optim.SGD, **engine_kw, **kw)
        if name == "no_exchange":
            opt.engine.exchange = False        # timing only: the replicas drift apart
        if name == "overlap":
            out["link_mode"] = opt.engine.links["ab"].mode
            out["bucket_bytes"] = opt.engine.bucket_bytes
            out["buckets"] = sum(len(b) for b in opt.engine._exchanges[0].bounds)
        for i in range(warmup):
            opt.step(data[i % len(data)])
        torch.cuda.synchronize()
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            opt.step(data[i % len(data)])     # reads the finite flag: the step has finished
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out["variants"][name] = {"median_ms": statistics.median(times) * 1e3,
                                 "mean_ms": statistics.fmean(times) * 1e3,
                                 "min_ms": min(times) * 1e3}
        if hasattr(opt.engine, "close"):
            opt.engine.close()
        del opt, model
        log(f"step {name:12s} {out['variants'][name]['median_ms']:8.3f} ms (median of {steps})")
    base = out["variants"]["no_exchange"]["median_ms"]
    for name in ("overlap", "no_overlap"):
        out["variants"][name]["exposed"] = (out["variants"][name]["median_ms"] - base) / base
    return out


# ---------------------------------------------------------------- summary, plot
def targets(results: Dict) -> List[Dict]:
    out = []
    rows = results.get("copies", [])
    big = [r["bytes"] for r in rows if r["method"] == "link"]
    if big:
        top = sorted(set(big))[-3:]            # the three largest sizes
        link = statistics.fmean(r["busbw_GBps"] for r in rows
                                if r["method"] == "link" and r["direction"] == "uni" and r["bytes"] in top)
        ref = statistics.fmean(r["busbw_GBps"] for r in rows
                               if r["method"] == "memcpy" and r["direction"] == "uni" and r["bytes"] in top)
        out.append({"target": "link >= 90% of plain cudaMemcpyAsync (uni busbw, 3 largest sizes)",
                    "value": link / ref, "met": link / ref >= TARGET_LINK_VS_MEMCPY})
    step = results.get("peer_step")
    if step:
        e = step["variants"]["overlap"]["exposed"]
        out.append({"target": "exposed communication with overlap <= 5% of the step",
                    "value": e, "met": e <= TARGET_EXPOSED})
    return out


def plot(results: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results.get("copies", []) + results.get("sendrecv", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, direction in zip(axes, ("uni", "bi")):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["bytes"], r["busbw_GBps"]) for r in rows
                         if r["method"] == method and r["direction"] == direction)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per direction")
        ax.set_title(f"{'unidirectional' if direction == 'uni' else 'bidirectional'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("busbw (GB/s)")
    fig.suptitle(f"sampa-fused copies, {results['device']} ({' -> '.join(results['pair'])})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs=2, default=None,
                    help="the two devices (default cuda:0 cuda:1, or cuda:0 twice on one GPU)")
    ap.add_argument("--min-size", type=parse_size, default=parse_size("4K"))
    ap.add_argument("--max-size", type=parse_size, default=None,
                    help="largest copy (default 1G on GPU, 64M with --cpu)")
    ap.add_argument("--model", default="resnet56", help="model of the step benchmark "
                    "(bench/models_bench.py: resnet56, resnet8_tiny, ...)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-step", action="store_true", help="skip the step benchmark")
    ap.add_argument("--no-dist", action="store_true", help="skip torch.distributed send/recv")
    ap.add_argument("--cpu", action="store_true",
                    help="no GPU needed: copy_ in host memory and gloo send/recv")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the plot goes beside it)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    results: Dict = {"torch": torch.__version__, "python": platform.python_version(),
                     "host": platform.node(), "skipped": {}}
    if args.cpu:
        max_size = args.max_size or parse_size("64M")
        sizes = sizes_between(args.min_size, max_size)
        results.update(device="cpu", pair=["cpu", "cpu"], sizes=sizes)
        results["copies"] = cpu_copy_benchmarks(sizes, log)
        if args.no_dist:
            results["skipped"]["sendrecv"] = "--no-dist"
        else:
            results["sendrecv"] = sendrecv_benchmarks("gloo", sizes, log)
        results["skipped"]["link"] = results["skipped"]["memcpy"] = "CPU run: needs CUDA"
        results["skipped"]["peer_step"] = "CPU run: the peer engine needs CUDA"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_comm.py: no CUDA device here. The peer copies and the peer-engine step "
                     "need one; `--cpu` measures the CPU variants only (Tensor.copy_ in host "
                     "memory, gloo send/recv between two processes).")
        from sampa_fused._ext import load_extension
        ext = load_extension(required=True, feature="bench_comm.py")
        if not ext.has_cuda():
            sys.exit("bench_comm.py: sampa_fused._C was built without CUDA; rebuild with "
                     "`pip install --no-build-isolation -e .` on this machine")
        n = torch.cuda.device_count()
        pair = args.devices or (["cuda:0", "cuda:1"] if n > 1 else ["cuda:0", "cuda:0"])
        a, b = torch.device(pair[0]), torch.device(pair[1])
        max_size = args.max_size or parse_size("1G")
        sizes = sizes_between(args.min_size, max_size)
        results.update(device=device_name(a), pair=list(pair), n_gpus=n, sizes=sizes,
                       cuda=torch.version.cuda,
                       peer_access=bool(ext.can_access_peer(a.index, b.index)))
        results["copies"] = copy_benchmarks(ext, a, b, sizes, log)
        if args.no_dist:
            results["skipped"]["sendrecv"] = "--no-dist"
        elif n < 2:
            results["skipped"]["sendrecv"] = ("NCCL needs one GPU per rank and this machine has "
                                              f"{n}; gloo cannot send/recv CUDA tensors")
        else:
            results["sendrecv"] = sendrecv_benchmarks("nccl", sizes, log)
        if args.no_step:
            results["skipped"]["peer_step"] = "--no-step"
        else:
            results["peer_step"] = peer_step_benchmark(tuple(pair), args.model, args.steps,
                                                       args.warmup, log)
    results["targets"] = targets(results)
    for t in results["targets"]:
        log(f"{'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f}")
    out = args.out or HERE / "results" / f"{results['device']}-comm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
