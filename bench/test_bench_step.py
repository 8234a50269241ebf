"""pytest-benchmark entry points for one training step, and a smoke run of
bench_step.py. Timings are reported, never asserted; GPU parts skip without CUDA.

    python -m pytest bench/test_bench_step.py --benchmark-only
"""
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402
from models_bench import MODELS  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
torch.set_num_threads(1)  # steadier CPU timings on a shared machine


def _batches(spec, device, n=4):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(spec.batch, *spec.input_shape, generator=gen).to(device),
             torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(device)) for _ in range(n)]


def _bench(benchmark, config, model_name, device, warmup, rounds):
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec.make().to(device)
    step = bench_step.make_step(config, model, device)
    batches = _batches(spec, device)
    for i in range(warmup):
        step(batches[i % 4])
    it = iter(range(10 ** 9))

    def one():
        loss = step(batches[next(it) % 4])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = benchmark.pedantic(one, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("config", ["sgd", "sam", "sampa_serial"])
def test_step_cpu_tiny(benchmark, config):
    _bench(benchmark, config, "resnet8_tiny", torch.device("cpu"), warmup=1, rounds=3)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("config", bench_step.CONFIGS)
def test_step_gpu_resnet56(benchmark, config):
    _bench(benchmark, config, "resnet56", torch.device("cuda"), warmup=8, rounds=30)


def _graph_warmup_steps() -> int:
    """Eager steps a graph configuration of bench_step takes before it captures:
    the engine's warmup_steps as bench_step's own optimizer has it (CUDA), or
    the engine's default where graphs cannot run (CPU)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        step = bench_step.make_step("sampa_streams_graph", MODELS["resnet8_tiny"].make().to(device),
                                    device)
        return step.__self__.engine.graph.warmup_steps
    from sampa_fused.engines.streams import StreamsEngine
    return inspect.signature(StreamsEngine).parameters["warmup_steps"].default


def test_smoke_run_writes_json_and_chart(tmp_path):
    # A graph is captured and replayed at step warmup_steps + 1: run exactly
    # that many (warmup_steps untimed, one timed) so graph_replays must be > 0.
    warmup = _graph_warmup_steps()
    res = bench_step.main(["--smoke", "--models", "resnet8_tiny", "--steps", "1",
                           "--warmup", str(warmup), "--repeats", "1", "--out", str(tmp_path)])
    stem = f"{res['device']}-step-smoke"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    configs = data["models"]["resnet8_tiny"]["configs"]
    assert set(configs) == set(bench_step.CONFIGS)
    for name, r in configs.items():
        if name in bench_step.NEEDS_CUDA and not torch.cuda.is_available():
            assert r == {"skipped": "needs CUDA"}
        else:
            assert "error" not in r, r
            assert r["step_ms"] > 0 and r["finite"]
            assert r["loss_last"] != r["loss_first"]        # the optimizer moved the model
    if torch.cuda.is_available():
        for name in ("sam_graph", "sampa_streams_graph"):
            assert configs[name]["graph_captures"] == 1, (name, configs[name])
            assert configs[name]["graph_replays"] > 0, (name, configs[name])
    for key in ("device_name", "torch", "triton", "cuda", "targets"):   # the JSON convention
        assert key in data, key
