"""Hugging Face Trainer through sampa_fused.integrations.huggingface, with a
tiny BERT built from a config (nothing downloaded). Skipped without transformers."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sampa_fused import MicroBatches, SAMPa  # noqa: E402
from sampa_fused.integrations.huggingface import SAMPaTrainer, model_loss  # noqa: E402

RHO, LAM, LR, CLIP = 0.05, 0.3, 3e-3, 0.5


def _bert():
    torch.manual_seed(0)
    # odd sizes; no dropout, so the Trainer and the plain loop draw no random numbers
    cfg = transformers.BertConfig(vocab_size=53, hidden_size=18, num_hidden_layers=1, num_attention_heads=3,
                                  intermediate_size=23, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _dataset(n=24, length=7):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 53, (n, length), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=LR, weight_decay=0.01,
                max_grad_norm=CLIP, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, seed=3, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _Recording(SAMPaTrainer):
    """Records what training_step got and counts the model's forwards."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen, self.forwards = [], 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.forwards += 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(self._prepare_inputs(inputs))
        return super().training_step(model, inputs, num_items_in_batch)


def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_equals_a_plain_sampa_loop(tmp_path, accumulation):
    _quiet()
    model = _bert()
    twin = copy.deepcopy(model)
    trainer = _Recording(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=accumulation),
                         train_dataset=_dataset(), rho=RHO, lam=LAM)
    trainer.train()
    steps = len(trainer.seen) // accumulation
    assert steps == 4
    # both passes of SAMPa per micro-batch, and nothing else: the Trainer's own
    # forward/backward did not run
    assert trainer.forwards == 2 * len(trainer.seen)

    # The plain loop: the same optimizer on the same batches, the same linear
    # schedule stepped after each step. Same ops in the same order: torch.equal.
    decay = set(trainer.get_decay_parameter_names(twin))
    named = list(twin.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    opt = SAMPa(twin, model_loss, torch.optim.AdamW, params=groups, rho=RHO, lam=LAM, lr=LR,
                max_grad_norm=CLIP)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    losses = []
    for i in range(steps):
        part = trainer.seen[i * accumulation:(i + 1) * accumulation]
        losses.append(opt.step(part[0] if accumulation == 1 else MicroBatches(part)).item())
        sched.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps
    for a, b in zip(logged, losses):     # the Trainer rounds what it logs
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([LR * (1 - i / steps) for i in range(steps)])


def test_resume_from_a_trainer_checkpoint_equals_an_uninterrupted_run(tmp_path):
    _quiet()
    data = _dataset()
    whole = _bert()
    t = SAMPaTrainer(model=whole, args=_args(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3),
                     train_dataset=data, rho=RHO, lam=LAM)
    t.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert os.path.isdir(ckpt)

    resumed = _bert()
    r = SAMPaTrainer(model=resumed, args=_args(tmp_path / "b", max_steps=6), train_dataset=data, rho=RHO,
                     lam=LAM)
    r.train(resume_from_checkpoint=str(ckpt))
    assert r.state.global_step == 6
    assert r.sampa.step_count == 6
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(t.sampa.state_dict()["state"].values(), r.sampa.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def test_an_optimizer_passed_in_is_used_and_other_optimizers_refused(tmp_path):
    _quiet()
    model = _bert()
    opt = SAMPa(model, model_loss, torch.optim.SGD, rho=RHO, lam=LAM, lr=0.1, momentum=0.9)
    t = SAMPaTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(),
                     optimizers=(opt, None))
    t.train()
    assert t.sampa is opt and opt.step_count == 2
    plain = _bert()
    bad = SAMPaTrainer(model=plain, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(),
                       optimizers=(torch.optim.SGD(plain.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="SAMPa or SAM"):
        bad.train()


def test_a_plain_trainer_is_pointed_to_the_integration(tmp_path):
    _quiet()
    model = _bert()
    opt = SAMPa(model, model_loss, torch.optim.SGD, rho=RHO, lam=LAM, lr=0.1)
    t = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(),
                             optimizers=(opt, None))
    with pytest.raises(TypeError, match="SAMPaTrainer"):
        t.train()                 # its own backward, then opt.step() with no batch


def test_several_processes_are_refused(tmp_path, monkeypatch):
    _quiet()
    t = SAMPaTrainer(model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=_dataset())
    monkeypatch.setattr(type(t.args), "world_size", property(lambda self: 2))
    with pytest.raises(RuntimeError, match="one process"):
        t.create_optimizer()
