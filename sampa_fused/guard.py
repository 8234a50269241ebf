"""The step guard: a step either commits entirely or leaves everything as it
was. It saves what a failed step must restore (the model's buffers), takes
the one host read of a step, applies the nonfinite policy, and is the only
code that touches a GradScaler's internals.

Bookkeeping of the steps (successful steps, skipped steps, the held batch)
lives in `Progress`, updated only here and by the optimizer's load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

NONFINITE_MODES = ("raise", "skip")


@dataclass
class Progress:
    t: int = 0                     # successful steps
    skipped: int = 0               # steps refused for non-finite values (nonfinite="skip", overflows)
    held: Any = None               # the held batch B_t (SAMPa)
    held_saved: Optional[dict] = None   # B_t from a checkpoint, until the next batch shows its types


class StepGuard:
    def __init__(self, model: nn.Module, nonfinite: str, scaler, method: str):
        self.model, self.nonfinite, self.method = model, nonfinite, method
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._modules = list(model.modules())
        self._entries: list = []         # (module, name, tensor) saved for a rollback
        self._saved: List[torch.Tensor] = []

    # ------------------------------------------------------------- buffers
    def save_buffers(self) -> None:
        """Keep the model's buffers (batch-norm statistics...) for a rollback,
        by owner and name: a module may replace a buffer object in its forward."""
        entries = [(m, n, t) for m in self._modules for n, t in m._buffers.items() if t is not None]
        if [(t.shape, t.dtype, t.device) for _, _, t in entries] != \
                [(t.shape, t.dtype, t.device) for t in self._saved]:
            self._saved = [t.detach().clone() for _, _, t in entries]
        elif entries:
            torch._foreach_copy_(self._saved, [t for _, _, t in entries])
        self._entries = entries

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for (m, n, t) in self._entries:
                m._buffers[n] = t
            if self._entries:
                torch._foreach_copy_([t for _, _, t in self._entries], self._saved)

    # ------------------------------------------------------------- decision
    def decide(self, flags: torch.Tensor, t: int, progress: Progress) -> bool:
        """Commit or refuse the step. The one host read of a step: two flags
        (loss finite, gradients finite), after all work is queued. A refused
        step has already left x, the state and gy as they were (the update
        kernels read the flag); this restores the buffers, then raises
        (nonfinite='raise') or counts the step as skipped. With a GradScaler
        a non-finite gradient is an overflow: skipped, and the scale backs
        off, as torch does."""
        loss_ok, grad_ok = (bool(v) for v in flags.tolist())
        fine = loss_ok and grad_ok
        overflow = loss_ok and not grad_ok and self.scaler is not None
        if fine or overflow or self.nonfinite == "skip":
            self._update_scaler(found_inf=not fine)
        if fine:
            return True
        self.restore_buffers()
        if not overflow and self.nonfinite == "raise":
            what = "loss" if not loss_ok else "gradient"
            raise FloatingPointError(
                f"{self.method}: non-finite {what} at step {t}; the step was refused "
                "and parameters, optimizer state and the held batch are unchanged. Lower the "
                "learning rate, check the data, or pass nonfinite='skip' to skip such steps.")
        progress.skipped += 1
        return False

    # ------------------------------------------------------------- GradScaler
    def init_scaler(self, device: torch.device) -> None:
        """torch creates a GradScaler's scale lazily, on the stream that first
        scales a loss; with the passes on two streams the other pass would
        read it unordered. Create it here, on the current stream, before the
        passes fork."""
        if self.scaler is not None and self.scaler._scale is None:
            self.scaler._lazy_init_scale_growth_tracker(device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def inv_scales(self, devices: Sequence[torch.device]) -> list:
        """Per device: 1 / loss scale as a device tensor (no host
        synchronisation), or None without a GradScaler."""
        if self.scaler is None:
            return [None] * len(devices)
        inv = self.scaler._scale.double().reciprocal().float()
        return [inv.to(d, non_blocking=True) for d in devices]

    def _update_scaler(self, found_inf: bool) -> None:
        scaler = self.scaler
        if scaler is None:
            return
        flag = torch.full((), float(found_inf), dtype=torch.float32, device=scaler._scale.device)
        scaler._per_optimizer_states[id(self)]["found_inf_per_device"][flag.device] = flag
        scaler.update()

    def scaler_tensors(self) -> List[torch.Tensor]:
        """The scaler's state on the device (replicas broadcast it)."""
        if self.scaler is None:
            return []
        if self.scaler._scale is None:
            self.scaler._lazy_init_scale_growth_tracker(self._device())
        return [self.scaler._scale, self.scaler._growth_tracker]

    def scaler_settings(self) -> str:
        s = self.scaler
        if s is None:
            return "none"
        return (f"{type(s).__name__} growth_factor={s.get_growth_factor()!r} "
                f"backoff_factor={s.get_backoff_factor()!r} growth_interval={s.get_growth_interval()!r}")

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
