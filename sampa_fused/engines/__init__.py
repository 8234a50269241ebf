"""Engines: where the two gradient passes of a step run.

An engine is built with the optimizer (`opt`) and implements:

- `sampa_gradients(held, batch) -> (loss_x, loss_y)`: the x̃-pass of the user's
  model (holding xt) on the held batch, its gradient into the flat buffer `g`,
  and the y-pass of the private y-model on the new batch, its gradient into
  `gy_new`. The two are independent (SPEC 1 step 3).
- `gradient(batch, which) -> loss`: one pass of the user's model into `g` (SAM).

Losses come back as 0-dim tensors on the device; no host synchronisation.

An engine may also set `replicas`: a list of lists of `SlabBuffers`, one list
per device (or rank) that keeps its own copy of x and the base state. The
optimizer applies the pre- and post-gradient updates and the check to every
replica (identical inputs give bit-identical results). Default: `[opt._bufs]`.
After `sampa_gradients` returns, every replica's `g` must hold gxt and its
`gy_new` must hold gy_{t+1} (the engine does the exchange), ordered on the
streams the updates run on.

Each engine lives in its own module, `engines/<name>.py`, class `ENGINES[name]`,
and takes its options as keyword arguments (`ENGINE_OPTIONS`), which users pass
to SAMPa/SAM directly: `SAMPa(..., engine="peer", devices=("cuda:0", "cuda:1"))`.
"""
from __future__ import annotations

import importlib

ENGINES = {"serial": "SerialEngine", "streams": "StreamsEngine", "peer": "PeerEngine",
           "distributed": "DistributedEngine"}


# Keyword arguments of SAMPa/SAM that go to the engine rather than the base optimizer.
ENGINE_OPTIONS = ("devices", "graph", "warmup_steps", "process_group", "sharded_batches",
                  "timeout", "bucket_bytes", "overlap", "staged")


def auto_engine(opt) -> str:
    """The engine that runs the two passes of SAMPa side by side where this
    process can: the process group when torch.distributed is initialised with
    an even world size; two GPUs when there are two and the CUDA extension is
    built; two streams on one GPU; else serial. SAM's passes are sequential:
    distributed (data parallel) when initialised, else serial."""
    import torch.distributed as dist
    sampa = getattr(opt, "_sampa", False)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if not sampa or dist.get_world_size() % 2 == 0:
            return "distributed"
    if not sampa:
        return "serial"
    from .. import _cuda
    devices = {_cuda.logical(b.x.device) for b in opt._bufs}
    if len(devices) == 1 and _cuda.is_cuda(next(iter(devices))):
        if _cuda.device_count() >= 2 and _cuda.has_peer_ops() and opt.rule.fused:
            return "peer"
        return "streams"
    return "serial"


def make_engine(name: str, opt, **options):
    if name == "auto":
        name = auto_engine(opt)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {tuple(ENGINES)} or 'auto'")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise NotImplementedError(f"engine {name!r} is not available in this version of "
                                  "sampa_fused; use engine='serial'") from None
    cls = getattr(module, ENGINES[name])
    import inspect
    accepted = inspect.signature(cls.__init__).parameters
    for key in options:
        if key not in accepted:
            raise TypeError(f"engine {name!r} does not take the option {key!r}")
    return cls(opt, **options)
