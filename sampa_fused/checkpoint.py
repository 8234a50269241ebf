"""Checkpoints: the optimizer's state_dict and its load, between torch's
format (the base optimizer's own state_dict, so a plain SGD/AdamW checkpoint
loads as a warm start and ours loads into torch's optimizer) and the flat
buffers. A load checks everything first, then applies it as a whole: on any
error nothing changes."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from . import tree

FORMAT = 2


def state_dict(opt) -> Dict[str, Any]:
    sd = opt.base.state_dict()
    # Compact copies: a checkpoint holds its own bytes, not views of the flat buffers.
    sd["state"] = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                       for n, v in st.items()} for k, st in sd["state"].items()}
    extra = {"format": FORMAT, "method": type(opt).__name__,
             "base": f"{type(opt.base).__module__}.{type(opt.base).__qualname__}",
             "t": opt.progress.t, "skipped_steps": opt.progress.skipped,
             "counts": list(opt.flat.counts), "params": len(opt.flat.layout.params),
             "shapes": [list(p.shape) for p in opt.flat.layout.params]}
    extra.update(opt._extra_state())
    sd["sampa_fused"] = extra
    return sd


def load_state_dict(opt, state_dict: Dict[str, Any]) -> None:
    """Everything is checked first; then the checkpoint is applied as a
    whole. On any error nothing changes."""
    cls = type(opt).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{cls}.load_state_dict: expected an optimizer state dict with 'state' "
                         "and 'param_groups'")
    sd = dict(state_dict)
    extra = sd.pop("sampa_fused", None)
    params = opt.flat.layout.params
    validate_checkpoint(opt, sd, extra, params)
    opt.base.load_state_dict(sd)            # torch checks the groups again and applies atomically
    opt.param_groups, opt.state = opt.base.param_groups, opt.base.state
    for group in opt.param_groups:          # a plain torch checkpoint has no rho / lam
        for k in opt._group_keys:
            group.setdefault(k, opt.defaults[k])
    if extra is not None:
        counts = list(extra["counts"])
        opt.progress.t, opt.progress.skipped = int(extra["t"]), int(extra.get("skipped_steps", 0))
    else:   # a plain base-optimizer checkpoint: warm start from its state
        counts = [count_from_base(opt, p) for p in params]
        opt.progress.t, opt.progress.skipped = 0, 0
    with torch.no_grad():
        for rep in (opt.engine.replicas if opt.update.fused else ()):
            for b in rep.slabs:
                names = set(b.state)
                for i, p in enumerate(params):
                    for n, v in opt.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor) and v.dim() > 0 and n not in names:
                            b.ensure_state([n])
                            names.add(n)
                for n, flat in b.state.items():
                    views = b.slab.views(flat)
                    for k, i in enumerate(b.slab.index):
                        v = opt.state.get(params[i], {}).get(n)
                        views[k].copy_(v) if v is not None else views[k].zero_()
    opt._load_extra(extra)
    opt.flat.set_counts(counts)
    if opt.update.fused:
        for st in opt.state.values():
            st.clear()
    opt._publish()
    # engines keeping copies of x elsewhere take the loaded values too
    opt.engine.sync_replicas()

def validate_checkpoint(opt, sd, extra, params) -> None:
    cls = type(opt).__name__
    where = f"{cls}.load_state_dict"
    if extra is not None:
        if extra.get("method") != cls:
            raise ValueError(f"{where}: this state dict was saved by {extra.get('method')}, not {cls}")
        mine = f"{type(opt.base).__module__}.{type(opt.base).__qualname__}"
        if extra.get("base", mine) != mine:
            raise ValueError(f"{where}: this state dict was saved with base optimizer "
                             f"{extra['base']}, this optimizer uses {mine}")
        if extra.get("params", len(params)) != len(params) or len(extra.get("counts", ())) != len(params):
            raise ValueError(f"{where}: the checkpoint has {extra.get('params')} parameters, this "
                             f"optimizer {len(params)}")
        for i, (p, shape) in enumerate(zip(params, extra.get("shapes", [list(p.shape) for p in params]))):
            if list(p.shape) != list(shape):
                raise ValueError(f"{where}: parameter {opt.flat.layout.names[i]} has shape "
                                 f"{tuple(p.shape)}, the checkpoint's has {tuple(shape)}")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{where}: the checkpoint has {len(groups)} param groups, this optimizer "
                         f"{len(opt.param_groups)}")
    for gi, (a, b) in enumerate(zip(groups, opt.param_groups)):
        if len(a["params"]) != len(b["params"]):
            raise ValueError(f"{where}: param group {gi} has {len(a['params'])} parameters in the "
                             f"checkpoint, {len(b['params'])} here")
    needed = [k for k in opt.base.defaults if k not in opt._group_keys]
    for gi, g in enumerate(groups):
        missing = [k for k in needed if k not in g]
        if missing:
            raise ValueError(f"{where}: param group {gi} of the checkpoint lacks {missing}, which "
                             f"{type(opt.base).__name__} needs; was it saved with another base "
                             "optimizer?")
    ids = [i for g in groups for i in g["params"]]
    by_id = dict(zip(ids, [p for g in opt.param_groups for p in g["params"]]))
    for k, st in sd["state"].items():
        p = by_id.get(k)
        if p is None:
            raise ValueError(f"{where}: the checkpoint has state for parameter id {k}, which is in "
                             "none of its param groups")
        for n, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"{where}: state {n!r} of parameter {opt._names.get(id(p), k)} has "
                                 f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
            if opt._rule is not None and n not in opt._rule.STATE:
                raise ValueError(f"{where}: state {n!r} of parameter {opt._names.get(id(p), k)} "
                                 f"is not {type(opt.base).__name__} state; was the checkpoint "
                                 "saved with another base optimizer?")
    opt._validate_extra(extra, params)


def count_from_base(opt, p) -> int:
    """A parameter's count from a plain torch optimizer's state: its 'step'
    entry, or 1 for state without one (SGD's momentum buffer: started,
    count unknown and unused), 0 without state."""
    st = opt.state.get(p)
    if not st:
        return 0
    return int(float(st["step"])) if "step" in st else 1


# ---------------------------------------------------------- the y-pass's part (SAMPa)
def y_extra(opt) -> dict:
    gy: List[Optional[torch.Tensor]] = [None] * len(opt.flat.layout.params)
    for b in opt.flat.primary.slabs:
        for i, v in zip(b.slab.index, b.slab.views(b.gy)):
            gy[i] = v.detach().clone()
    progress = opt.progress
    held = progress.held_saved if progress.held_saved is not None else (
        tree.encode(tree.clone(progress.held)) if progress.held is not None else None)
    return {"gy": gy, "gy_sq": opt.flat.primary.gy_sq.detach().clone(), "held_batch": held}

def validate_y_extra(opt, extra, params) -> None:
    if extra is None:
        return
    where = f"{type(opt).__name__}.load_state_dict"
    for key in ("gy", "gy_sq", "held_batch"):
        if key not in extra:
            raise ValueError(f"{where}: the checkpoint lacks {key!r} (was it saved by another "
                             "version or edited?)")
    gy = extra["gy"]
    if len(gy) != len(params):
        raise ValueError(f"{where}: the checkpoint has gy for {len(gy)} parameters, this "
                         f"optimizer has {len(params)}")
    for i, (p, t) in enumerate(zip(params, gy)):
        if t is not None and tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: gy of parameter {opt.flat.layout.names[i]} has shape "
                             f"{tuple(t.shape)}, the parameter {tuple(p.shape)}")
    held = extra["held_batch"]
    if held is None and int(extra.get("t", 0)) > 0:
        raise ValueError(f"{where}: the checkpoint has taken {int(extra['t'])} steps but its "
                         "held_batch is None: the next step would treat the new batch as the "
                         "first (was it edited?)")
    if held is not None and not (isinstance(held, dict) and "k" in held):
        raise ValueError(f"{where}: the checkpoint's held batch is not in this version's format")

def load_y_extra(opt, extra) -> None:
    rep = opt.flat.primary
    with torch.no_grad():
        for b in rep.slabs:
            if extra is not None:
                b.slab.gather([t.to(b.gy.device) if t is not None else None for t in extra["gy"]], b.gy)
            else:
                b.gy.zero_()
        rep.gy_sq.copy_(extra["gy_sq"] if extra is not None else torch.zeros(()))
    opt.progress.held = None
    opt.progress.held_saved = extra["held_batch"] if extra is not None else None


