"""Models that arrive wrapped by a launcher: DistributedDataParallel, FSDP
(1 or 2) or Lightning Fabric's `_FabricModule`. Recognised at construction,
before any collective runs, so a combination that cannot work is refused at
once on every rank instead of deadlocking in the first step's exchange."""
from __future__ import annotations

from typing import Optional

from torch import nn


def _fsdp_classes() -> tuple:
    try:
        from torch.distributed import fsdp
    except ImportError:       # a torch built without distributed
        return ()
    return tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None),
                             getattr(fsdp, "FSDPModule", None)) if c is not None)


def _is_fabric(module: nn.Module) -> bool:
    # by name: lightning is optional, and importing it costs seconds
    return type(module).__name__ == "_FabricModule" and hasattr(module, "_forward_module")


def describe(model: nn.Module) -> Optional[tuple]:
    """(fabric, ddp, fsdp): which wrappers `model` carries, or None if none.
    Fabric's wrapper holds the strategy's wrapper (DDP, FSDP) or the bare module."""
    fabric = _is_fabric(model)
    inner = model._forward_module if fabric else model
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    fsdp = _fsdp_classes()
    sharded = bool(fsdp) and any(isinstance(m, fsdp) for m in model.modules())
    if not (fabric or ddp or sharded):
        return None
    return fabric, ddp, sharded


def refuse_wrapped(model: nn.Module, engine: str, method: str) -> None:
    """Raise, in one line saying what to pass instead, for a wrapped model the
    engine cannot run. Allowed: SAM on a DDP-wrapped model with a one-process
    engine (data-parallel SAM: DDP averages both of its passes), and Fabric's
    wrapper around a bare module on a one-process engine."""
    found = describe(model)
    if found is None:
        return
    fabric, ddp, sharded = found
    name = ("FSDP" if sharded else "DistributedDataParallel" if ddp else "Lightning Fabric's _FabricModule")
    if fabric and (ddp or sharded):
        name = f"Lightning Fabric's _FabricModule around {name}"
    bare = "model.module" if (ddp or fabric) and not sharded else "the module before wrapping it"
    if sharded:
        raise ValueError(f"{method}: the model is wrapped by {name}, which shards its parameters; "
                         f"{method} keeps them whole in flat buffers: build it on the bare module "
                         f"({bare}) and use engine='distributed' for data parallelism, or keep it "
                         f"sharded with sampa_fused.Sharded{method} (model = sampa_fused.shard(module), "
                         "on a (pass, shard) mesh)")
    if engine in ("distributed", "peer"):
        raise ValueError(f"{method}: the model is wrapped by {name}; the {engine} engine runs its own "
                         f"data parallelism and would deadlock with the wrapper's: pass the bare "
                         f"module ({bare})")
    if ddp and method != "SAM":
        raise ValueError(f"{method}: the model is wrapped by {name}, which would average the "
                         "x̃-pass's gradient over the ranks but not the y-pass's, so the ranks "
                         f"would drift apart: pass the bare module ({bare}) with engine='distributed'")


def resolved_engine(engine: str) -> str:
    """'auto' as the wrapper check needs it: distributed in an initialised group of more than one."""
    if engine != "auto":
        return engine
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "distributed"
    return engine


def reduces_own_parameters(model: nn.Module) -> bool:
    """A DDP wrapper averages the gradients of the module's own parameters
    only: a pass run on pass buffers swapped into the module would escape it,
    so such a model's passes must run on its parameters (the in-place plan)."""
    found = describe(model)
    return found is not None and found[1]
