"""Scenarios on gloo ranks for the tests: `launch(module, name, world, args)`
runs `module.name(rank, world, *args)` in `world` processes of a fork
server and returns each rank's result. Never hangs: stragglers are killed
after `deadline` and the test fails naming them."""
from __future__ import annotations

import datetime
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

import sampa_fused

REPO = str(Path(sampa_fused.__file__).resolve().parents[1])


def _rank(rank, world, init_file, out_dir, module, name, args, init_timeout_s):
    sys.path.insert(0, REPO)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=init_timeout_s))
        res = getattr(importlib.import_module(module), name)(rank, world, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        res = {"worker_error": traceback.format_exc()}
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    sys.stdout.flush()
    # A broken process group may block in its destructor: leave at once.
    os._exit(0)


def _context(module: str):
    # A fork server that has imported torch once: each rank then starts in
    # well under a second instead of importing torch again (seconds each on
    # loaded machines), and, unlike plain fork, from a single-threaded parent.
    ctx = mp.get_context("forkserver")
    # (torch._dynamo: torch.optim imports it on first use, seconds by itself)
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "sampa_fused", module])
    return ctx


def launch(module: str, name: str, world: int, args=(), deadline: float = 150.0, expect_dead=(),
           init_timeout_s: float = 60.0, what: str = ""):
    """Each rank's result (None for ranks in `expect_dead`, which are left to die)."""
    ctx = _context(module)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_rank, args=(r, world, init_file, tmp, module, name, tuple(args),
                                                 init_timeout_s))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        for r, p in enumerate(procs):
            if r in expect_dead:
                continue
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in expect_dead]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        assert not hung, f"ranks {hung}{what} did not finish within {deadline} s (a hang)"
        out = []
        for r in range(world):
            if r in expect_dead:
                out.append(None)
                continue
            path = os.path.join(tmp, f"{r}.pt")
            assert os.path.exists(path), f"rank {r} exited with code {procs[r].exitcode} and no result"
            res = torch.load(path, weights_only=False)
            assert "worker_error" not in res, f"rank {r} failed:\n{res['worker_error']}"
            out.append(res)
        return out
