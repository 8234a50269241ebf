"""Recorded trajectories: the redesign of the library must keep these (torch
backend, serial engine) within 1e-6 relative. `python tests/trajectories.py`
records them again into tests/data/trajectories.pt (only do that on purpose:
the file is the reference)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import SmallNet, ce_loss, make_batches  # noqa: E402

from sampa_fused import SAM, SAMPa  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "trajectories.pt"
STEPS = 20

# name: (method, base optimizer, keyword arguments, model keyword arguments)
CONFIGS = {
    "sgd-momentum-dampening": (SAMPa, torch.optim.SGD, dict(rho=0.1, lam=0.3, lr=0.05, momentum=0.9,
                                                            dampening=0.1, weight_decay=5e-4), {}),
    "sgd-nesterov": (SAMPa, torch.optim.SGD, dict(rho=0.05, lam=0.2, lr=0.05, momentum=0.9, nesterov=True,
                                                  weight_decay=1e-3), {}),
    "adamw-amsgrad": (SAMPa, torch.optim.AdamW, dict(rho=0.05, lam=0.5, lr=3e-3, weight_decay=0.05,
                                                     amsgrad=True), {}),
    "generic-rmsprop": (SAMPa, torch.optim.RMSprop, dict(rho=0.05, lam=0.2, lr=1e-3, momentum=0.5), {}),
    "no-batchnorm-lam0": (SAMPa, torch.optim.SGD, dict(rho=0.1, lam=0.0, lr=0.1, momentum=0.9), dict(bn=False)),
    "clipping": (SAMPa, torch.optim.SGD, dict(rho=0.1, lam=0.3, lr=0.1, momentum=0.9, max_grad_norm=0.3), {}),
    "accumulation": (SAMPa, torch.optim.AdamW, dict(rho=0.05, lam=0.2, lr=1e-2, accumulation_steps=3), {}),
    "grad-scaler": (SAMPa, torch.optim.SGD, dict(rho=0.1, lam=0.3, lr=0.05, momentum=0.9), {}),
    "sam-sgd": (SAM, torch.optim.SGD, dict(rho=0.1, lr=0.05, momentum=0.9, weight_decay=5e-4), {}),
    "sam-adamw": (SAM, torch.optim.AdamW, dict(rho=0.05, lr=3e-3, weight_decay=0.01), {}),
}


def run(name: str):
    """Final parameters, buffers and per-step losses of one configuration."""
    method, base, kw, model_kw = CONFIGS[name]
    torch.manual_seed(0)
    model = SmallNet(**model_kw)
    kw = dict(kw)
    if name == "grad-scaler":
        kw["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    opt = method(model, ce_loss, base, engine="serial", backend="torch", **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    losses = []
    for b in make_batches(STEPS, batch=12):
        losses.append(opt.step(b).item())
        sched.step()
    return {"losses": torch.tensor(losses, dtype=torch.float64),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    DATA.parent.mkdir(exist_ok=True)
    torch.save({name: run(name) for name in CONFIGS}, DATA)
    print(f"recorded {len(CONFIGS)} trajectories into {DATA}")
