"""Base-optimizer rules: the exact update of torch.optim.SGD and
torch.optim.AdamW written over flat tensors, so that one call updates a whole
param-group segment. Each rule computes out of place and returns the new
values, which serves both the peek (SPEC 1 step 2: state untouched) and the
real step (SPEC 1 step 5: caller writes the results back).

Any other base optimizer goes through `GenericRule`, which runs the base
optimizer's own `step()` (exact by construction, slower).

Math is done in fp32 for low-precision parameters; the op order follows
torch's single-tensor implementations so results agree to rounding.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """fp32 math for 16-bit tensors; fp32 and fp64 keep their precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _scalar(v, name: str) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"hyperparameter {name} must be a scalar, got shape {tuple(v.shape)}")
        v = v.item()
    return float(v)


class SGDRule:
    """torch.optim.SGD: momentum, dampening, nesterov, weight decay, maximize."""
    name = "sgd"
    fused = True

    @staticmethod
    def hyper(group: dict) -> dict:
        return dict(lr=_scalar(group["lr"], "lr"), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group.get("maximize", False)))

    @staticmethod
    def state_names(hp: dict) -> List[str]:
        return ["momentum_buffer"] if hp["momentum"] != 0 else []

    @staticmethod
    def uses_state(hp: dict) -> bool:
        return hp["momentum"] != 0

    @staticmethod
    def update(x: Tensor, g: Tensor, state: Dict[str, Tensor], hp: dict, step: int):
        """One SGD step from (x, state) with gradient g. `step` is the number of
        steps already taken (0: no momentum buffer yet). Returns (x, state)."""
        x, g = upcast(x), upcast(g)
        if hp["maximize"]:
            g = -g
        if hp["weight_decay"] != 0:
            g = g.add(x, alpha=hp["weight_decay"])
        new_state = {}
        mu = hp["momentum"]
        if mu != 0:
            if step == 0:
                buf = g.clone()
            else:
                buf = upcast(state["momentum_buffer"]).mul(mu).add_(g, alpha=1 - hp["dampening"])
            new_state["momentum_buffer"] = buf
            g = g.add(buf, alpha=mu) if hp["nesterov"] else buf
        return x.add(g, alpha=-hp["lr"]), new_state


class AdamWRule:
    """torch.optim.AdamW: decoupled weight decay, bias correction, amsgrad, maximize."""
    name = "adamw"
    fused = True

    @staticmethod
    def hyper(group: dict) -> dict:
        b1, b2 = group["betas"]
        return dict(lr=_scalar(group["lr"], "lr"), beta1=_scalar(b1, "beta1"), beta2=_scalar(b2, "beta2"),
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    amsgrad=bool(group["amsgrad"]), maximize=bool(group.get("maximize", False)))

    @staticmethod
    def state_names(hp: dict) -> List[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])

    @staticmethod
    def uses_state(hp: dict) -> bool:
        return True

    @staticmethod
    def update(x: Tensor, g: Tensor, state: Dict[str, Tensor], hp: dict, step: int):
        x, g = upcast(x), upcast(g)
        if hp["maximize"]:
            g = -g
        t = step + 1
        lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
        if hp["weight_decay"] != 0:
            x = x.mul(1 - lr * hp["weight_decay"])
        m = upcast(state["exp_avg"]).lerp(g, 1 - b1)
        v = upcast(state["exp_avg_sq"]).mul(b2).addcmul_(g, g, value=1 - b2)
        new_state = {"exp_avg": m, "exp_avg_sq": v}
        step_size = lr / (1 - b1 ** t)
        bc2_sqrt = (1 - b2 ** t) ** 0.5
        if hp["amsgrad"]:
            v = torch.maximum(upcast(state["max_exp_avg_sq"]), v)
            new_state["max_exp_avg_sq"] = v
        denom = (v.sqrt() / bc2_sqrt).add_(hp["eps"])
        return x.addcdiv(m, denom, value=-step_size), new_state


class GenericRule:
    """Any other torch.optim.Optimizer: its own step(), on the real parameters."""
    name = "generic"
    fused = False

    @staticmethod
    def hyper(group: dict) -> dict:
        return {}

    @staticmethod
    def state_names(hp: dict) -> List[str]:
        return []

    @staticmethod
    def uses_state(hp: dict) -> bool:
        return False


def rule_for(base: torch.optim.Optimizer):
    """The rule that reproduces `base` exactly. Subclasses may override step(),
    so only the exact classes get the flat rules."""
    if type(base) is torch.optim.SGD and not base.defaults.get("differentiable", False):
        return SGDRule
    if type(base) is torch.optim.AdamW and not base.defaults.get("differentiable", False):
        return AdamWRule
    return GenericRule


def check_group(group: dict, rule, where: str) -> Optional[str]:
    """A message naming what is wrong with a param group's hyperparameters, or None."""
    rho, lam = group.get("rho"), group.get("lam")
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0 or rho == float("inf"):
        return f"{where}: rho must be a finite number >= 0, got {rho!r}"
    if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0 <= lam <= 1):
        return f"{where}: lam must be a number in [0, 1], got {lam!r}"
    return None
