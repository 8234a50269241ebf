"""Engines: where the gradient passes of a step run (the contract is in
`base.py`). Each engine lives in its own module, `engines/<name>.py`, class
`ENGINES[name]`, and takes its options as keyword arguments (`ENGINE_OPTIONS`),
which users pass to SAMPa/SAM directly:
`SAMPa(..., engine="peer", devices=("cuda:0", "cuda:1"))`.
"""
from __future__ import annotations

import importlib
import inspect

ENGINES = {"serial": "SerialEngine", "streams": "StreamsEngine", "peer": "PeerEngine",
           "distributed": "DistributedEngine"}


# Keyword arguments of SAMPa/SAM that go to the engine rather than the base optimizer.
ENGINE_OPTIONS = ("devices", "graph", "warmup_steps", "process_group", "sharded_batches",
                  "timeout", "bucket_bytes", "overlap", "staged", "verify_every")


def auto_engine(ctx) -> str:
    """The engine that runs the two passes of SAMPa side by side where this
    process can: the process group when torch.distributed is initialised with
    an even world size; two GPUs when there are two and the CUDA extension is
    built; two streams on one GPU; else serial. SAM's passes are sequential:
    distributed (data parallel) when initialised, else serial."""
    import torch.distributed as dist

    from .. import _cuda
    sampa = ctx.method == "SAMPa"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if not sampa or dist.get_world_size() % 2 == 0:
            return "distributed"
    if not sampa:
        return "serial"
    devices = {_cuda.logical(p.device) for p in ctx.params}
    if len(devices) == 1 and _cuda.is_cuda(next(iter(devices))):
        if _cuda.device_count() >= 2 and _cuda.has_peer_ops() and ctx.fused:
            return "peer"
        return "streams"
    return "serial"


def engine_class(name: str, ctx):
    """The engine class `name` ('auto': see auto_engine) names; `ctx` needs
    method, params and fused. The optimizer asks it for its buffer plan
    before it lays out its buffers."""
    if name == "auto":
        name = auto_engine(ctx)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {tuple(ENGINES)} or 'auto'")
    module = importlib.import_module(f"{__name__}.{name}")
    return getattr(module, ENGINES[name])


def make_engine(name, ctx, **options):
    """`name`: an engine name, 'auto', or a class from engine_class."""
    cls = name if isinstance(name, type) else engine_class(name, ctx)
    name = cls.name
    accepted = inspect.signature(cls.__init__).parameters
    for key in options:
        if key not in accepted:
            raise TypeError(f"engine {name!r} does not take the option {key!r}")
    return cls(ctx, **options)
