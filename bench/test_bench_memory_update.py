"""Smoke runs of bench_memory.py and bench_cpu_update.py: they run, write
their JSON, and read what they claim to (the measurements are the scripts')."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu_update  # noqa: E402
import bench_memory  # noqa: E402


def test_memory_smoke(tmp_path):
    out = tmp_path / "m.json"
    assert bench_memory.main(["--params", "3e5", "--steps", "1", "--configs", "torch-sgd,sampa-serial",
                              "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch-sgd", "sampa-serial"}
    # SAMPa keeps g, gy_new, gy, a pass buffer and momentum between steps: far more than nothing
    assert rows["sampa-serial"]["steady_per_param"] > rows["torch-sgd"]["steady_per_param"] + 4


def test_davda54_reference_matches_its_algorithm():
    import torch
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = bench_memory.davda54_sam(torch)([w], torch.optim.SGD, rho=0.5, lr=0.1)
    w0 = w.detach().clone()
    (w * w).sum().backward()
    g = w.grad.clone()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), w0 + 0.5 * g / (g.norm() + 1e-12))
    (w * w).sum().backward()
    g2 = w.grad.clone()
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g2)


def test_cpu_update_smoke(tmp_path):
    out = tmp_path / "u.json"
    assert bench_cpu_update.main(["--model", "resnet8_tiny", "--rounds", "1", "--steps", "1",
                                  "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["ratio_to_davda54"]) == {"sam", "sampa"} and d["tensors"] > 10
