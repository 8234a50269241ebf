"""Engines: where the two gradient passes of a step run.

An engine is built with the optimizer (`opt`) and implements:

- `sampa_gradients(held, batch) -> (loss_x, loss_y)`: the x̃-pass of the user's
  model (holding xt) on the held batch, its gradient into the flat buffer `g`,
  and the y-pass of the private y-model on the new batch, its gradient into
  `gy_new`. The two are independent (SPEC 1 step 3).
- `gradient(batch, which) -> loss`: one pass of the user's model into `g` (SAM).

Losses come back as 0-dim tensors on the device; no host synchronisation.
Each engine lives in its own module, `engines/<name>.py`, class `ENGINES[name]`.
"""
from __future__ import annotations

import importlib

ENGINES = {"serial": "SerialEngine", "streams": "StreamsEngine", "peer": "PeerEngine",
           "distributed": "DistributedEngine"}


def auto_engine(opt) -> str:
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
    return getattr(module, ENGINES[name])(opt, **options)
