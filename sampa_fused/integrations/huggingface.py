"""Hugging Face `transformers.Trainer` with SAMPa or SAM.

    from sampa_fused.integrations.huggingface import SAMPaTrainer
    trainer = SAMPaTrainer(model=model, args=args, train_dataset=ds, rho=0.05, lam=0.2)
    trainer.train()

The optimizer computes both of its gradients itself (`opt.step(inputs)`), so
the Trainer's own backward, gradient clipping and optimizer step must not run:
`training_step` calls `opt.step`, the Trainer's optimizer slot holds a stand-in
whose `step` does nothing (schedulers act on the same param groups; its
`state_dict` is the optimizer's, held batch included, so `save_steps` and
`resume_from_checkpoint` continue bit-identically), and `max_grad_norm` moves
into the optimizer it builds (clipping the combined gradient; an optimizer
you pass clips only with its own `max_grad_norm`). Gradient accumulation: the
Trainer's `gradient_accumulation_steps` micro-batches of one update become one
step over `MicroBatches` (each pass accumulates over them, weighted by samples).

Without `optimizers=`, SAMPa (or SAM with `lam=None`) is built over AdamW with
the Trainer's learning rate, betas, epsilon and weight-decay groups, and its
loss is the Trainer's `compute_loss`. Pass `optimizers=(SAMPa(...), scheduler)`
for anything else. One process (CPU or one GPU): several processes are refused
(the Trainer would shard the data and wrap the model in DDP around an
optimizer that steps the bare module).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import transformers
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("sampa_fused.integrations.huggingface needs transformers: "
                      "pip install 'sampa-fused[huggingface]' (or pip install transformers)") from e

from ..batching import MicroBatches
from ..optim import SAM, SAMPa
from ..sharpness import Sharpness

__all__ = ["SAMPaTrainerMixin", "SAMPaTrainer", "model_loss"]


def model_loss(model, inputs):
    """loss_fn for Hugging Face models: the model's output, whose `.loss` is used."""
    return model(**inputs)


class _AlreadyStepped(torch.optim.Optimizer):
    """What the Trainer sees as its optimizer: the step already happened inside
    training_step, so `step` and `zero_grad` do nothing; param groups, state
    and checkpoints are the real optimizer's (looked up each time: loading a
    state dict gives it new group dicts)."""

    def __init__(self, inner: Sharpness):  # no Optimizer.__init__: it would build groups of its own
        self.inner = inner

    param_groups = property(lambda self: self.inner.param_groups)
    state = property(lambda self: self.inner.state)
    defaults = property(lambda self: self.inner.defaults)

    def step(self, closure=None):
        return self.inner.last_loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"AlreadyStepped({self.inner!r})"


class SAMPaTrainerMixin:
    """Mix into a `transformers.Trainer` subclass ahead of it:
    `class MyTrainer(SAMPaTrainerMixin, MyOtherTrainer)`. Keyword arguments:
    `rho`, `lam` (None: SAM), `engine` (default "serial"), used when the
    Trainer builds the optimizer itself."""

    def __init__(self, *args, rho: float = 0.05, lam: Optional[float] = 0.2, engine: str = "serial",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.sampa_options = dict(rho=rho, lam=lam, engine=engine)
        # The Trainer would clip p.grad after the step (and take a norm of it
        # to log): clipping belongs inside the step, on the combined gradient.
        self.sampa_max_grad_norm = self.args.max_grad_norm if (self.args.max_grad_norm or 0) > 0 else None
        self.args.max_grad_norm = 0.0
        self.sampa: Optional[Sharpness] = None
        self._pending: list = []

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if isinstance(self.optimizer, _AlreadyStepped):
            return self.optimizer
        if self.args.world_size > 1:
            # the Trainer would shard the data and wrap the model in DDP, while
            # the optimizer steps the bare module: the ranks would drift apart
            raise RuntimeError(f"{type(self).__name__} runs in one process (world size here: "
                               f"{self.args.world_size}); for several processes use "
                               "SAMPa(..., engine='distributed') in your own loop under torchrun")
        if self.optimizer is None:
            self.optimizer = self._build_sampa(self.model if model is None else model)
        if not isinstance(self.optimizer, Sharpness):
            raise TypeError(f"{type(self).__name__}: optimizers=(opt, scheduler) needs a SAMPa or SAM "
                            f"optimizer, got {type(self.optimizer).__name__}")
        self.sampa = self.optimizer
        self.optimizer = _AlreadyStepped(self.sampa)
        return self.optimizer

    def _build_sampa(self, model):
        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        opts = dict(self.sampa_options)
        lam = opts.pop("lam")
        method, extra = (SAM, {}) if lam is None else (SAMPa, {"lam": lam})
        return method(model, self._trainer_loss, torch.optim.AdamW, params=groups, lr=args.learning_rate,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                      max_grad_norm=self.sampa_max_grad_norm, **opts, **extra)

    def _trainer_loss(self, model, inputs):
        return self.compute_loss(model, inputs)

    # ------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sampa is None:
            self.create_optimizer()
        model.train()
        self._pending.append(self._prepare_inputs(inputs))
        wanted = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if len(self._pending) < wanted:
            # the loss of the whole update is returned with its last micro-batch
            return torch.zeros((), device=self.args.device)
        batch = self._pending[0] if len(self._pending) == 1 else MicroBatches(self._pending)
        self._pending = []
        return self.sampa.step(batch).detach()

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm      # no norm of p.grad after the step to log: the step owns the gradients


class SAMPaTrainer(SAMPaTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` training with SAMPa (or SAM: `lam=None`)."""
