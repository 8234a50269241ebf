"""Saving the model while the optimizer holds it: the
parameters are views of one flat buffer, but `model.state_dict()` gives
compact copies, so safetensors, accelerate and torch.save of a submodule
see ordinary tensors; loading back is bit-identical and training goes on."""
import gc
import io

import pytest
import torch
from reference import SmallNet, ce_loss, make_batches

from sampa_fused import SAM, SAMPa

CLASSES = [SAMPa, SAM]


def _make(cls, seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    kw = {"lam": 0.3} if cls is SAMPa else {}
    opt = cls(model, ce_loss, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend="torch", **kw)
    return model, opt


def _trained(cls, steps=3):
    model, opt = _make(cls)
    for b in make_batches(steps):
        opt.step(b)
    return model, opt


def _assert_same(sd, model):
    ref = model.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape


def _continue_equals_twin(cls, model, opt):
    """A step after saving works and equals a twin that did not save."""
    twin_model, twin_opt = _trained(cls)
    b = make_batches(5, seed=7)[0]
    opt.step(b)
    twin_opt.step(b)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_is_compact_and_training_keeps_flat_buffers(cls):
    model, opt = _trained(cls)
    flat = opt.flat.primary.slabs[0].x.untyped_storage().data_ptr()
    sd = model.state_dict()
    for k, v in sd.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    # the model still trains on its views
    assert all(p.untyped_storage().data_ptr() == flat for p in model.parameters())
    # keep_vars=True: the Parameters themselves, as torch returns them
    sdv = model.state_dict(keep_vars=True)
    assert sdv["fc1.weight"] is model.fc1.weight
    # load_state_dict copies into the views
    fresh_model, _ = _make(cls, seed=1)
    fresh_model.load_state_dict(sd)
    w = model.fc1.weight
    ptr = w.data_ptr()
    model.load_state_dict(fresh_model.state_dict())
    assert model.fc1.weight.data_ptr() == ptr and w.untyped_storage().data_ptr() == flat
    _continue_equals_twin(cls, model, opt)


@pytest.mark.parametrize("cls", CLASSES)
def test_torch_save_submodule_writes_its_own_bytes(cls):
    model, opt = _trained(cls)
    buf = io.BytesIO()
    torch.save(model.fc1.state_dict(), buf)
    own = sum(t.numel() * t.element_size() for t in model.fc1.state_dict().values())
    whole = opt.flat.primary.slabs[0].x.numel() * 4
    assert own < whole / 2                # else the test shows nothing
    assert buf.tell() < own + 2048        # pickle framing only, not the flat buffer
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh, _ = _make(cls, seed=1)
    fresh.fc1.load_state_dict(sd)
    for k, v in model.fc1.state_dict().items():
        assert torch.equal(fresh.fc1.state_dict()[k], v)
    _continue_equals_twin(cls, model, opt)


@pytest.mark.parametrize("cls", CLASSES)
def test_safetensors_save_file_and_save_model(cls, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, opt = _trained(cls)
    st.save_file(model.state_dict(), str(tmp_path / "a.safetensors"))
    st.save_model(model, str(tmp_path / "b.safetensors"))
    for f in ("a", "b"):
        sd = st.load_file(str(tmp_path / f"{f}.safetensors"))
        fresh, _ = _make(cls, seed=1)
        fresh.load_state_dict(sd)
        _assert_same(fresh.state_dict(), model)
    fresh, _ = _make(cls, seed=1)
    missing, unexpected = st.load_model(fresh, str(tmp_path / "b.safetensors"))
    assert not missing and not unexpected
    _assert_same(fresh.state_dict(), model)
    _continue_equals_twin(cls, model, opt)


@pytest.mark.parametrize("cls", CLASSES)
def test_accelerate_save_model_and_save_state(cls, tmp_path, capsys, caplog):
    accelerate = pytest.importorskip("accelerate")
    st = pytest.importorskip("safetensors.torch")
    model, opt = _trained(cls)
    acc = accelerate.Accelerator(cpu=True)
    acc.save_model(model, str(tmp_path / "model"))
    out = capsys.readouterr()
    assert "Removed shared tensor" not in out.out + out.err + caplog.text
    files = list((tmp_path / "model").glob("*.safetensors"))
    assert len(files) == 1
    sd = st.load_file(str(files[0]))
    _assert_same(sd, model)
    fresh, _ = _make(cls, seed=1)
    fresh.load_state_dict(sd)
    _assert_same(fresh.state_dict(), model)

    # save_state: the model's weights by accelerate; the optimizer by its own state_dict
    acc.register_for_checkpointing(model)
    acc.save_state(str(tmp_path / "state"))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    out = capsys.readouterr()
    assert "Removed shared tensor" not in out.out + out.err + caplog.text

    fresh, fresh_opt = _make(cls, seed=1)
    acc2 = accelerate.Accelerator(cpu=True)
    acc2.register_for_checkpointing(fresh)
    acc2.load_state(str(tmp_path / "state"))
    buf.seek(0)
    fresh_opt.load_state_dict(torch.load(buf, weights_only=False))
    _assert_same(fresh.state_dict(), model)
    b = make_batches(5, seed=7)[0]
    fresh_opt.step(b)
    _continue_equals_twin(cls, model, opt)        # model, opt take the same step b
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_hooks_follow_relayout_and_go_with_the_optimizer():
    torch.manual_seed(0)
    model = SmallNet()
    opt = SAMPa(model, ce_loss, torch.optim.SGD, rho=0.1, lam=0.3, lr=0.05, backend="torch",
                params=list(model.fc1.parameters()))
    opt.step(make_batches(1)[0])
    sd = model.fc2.state_dict()
    assert sd["weight"].untyped_storage().data_ptr() == model.fc2.weight.data_ptr()   # not ours: as torch
    opt.add_param_group({"params": list(model.fc2.parameters()), "lr": 0.01})        # a relayout
    flat = opt.flat.primary.slabs[0].x.untyped_storage().data_ptr()
    assert model.fc2.weight.untyped_storage().data_ptr() == flat
    opt.step(make_batches(2)[1])
    sd = model.fc2.state_dict()
    assert sd["weight"].untyped_storage().nbytes() == model.fc2.weight.numel() * 4
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in model.state_dict().values())
    del opt
    gc.collect()
    for m in model.modules():
        assert not m._state_dict_hooks
