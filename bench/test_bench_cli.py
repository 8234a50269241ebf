"""The benchmarks' command lines: --help prints help (and runs nothing), and
a CPU run's lines say that peak memory is not measured (no "nan")."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_step  # noqa: E402


def test_grad_tracking_help_prints_help_and_runs_nothing():
    p = subprocess.run([sys.executable, str(HERE / "bench_grad_tracking.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage:") and "--rounds" in p.stdout
    assert "parameter tensors:" not in p.stdout          # the benchmark's result line


def test_step_lines_on_cpu_name_no_nan():
    cpu = bench_step.result_line("resnet20", "sampa_serial", {"step_ms": 12.5, "peak_mem_gib": None})
    assert "nan" not in cpu and "n/a" in cpu and "12.500 ms/step" in cpu
    gpu = bench_step.result_line("resnet20", "sampa_streams", {"step_ms": 1.25, "peak_mem_gib": 0.5})
    assert "peak 0.500 GiB" in gpu
    assert "skipped" in bench_step.result_line("resnet20", "sampa_peer", {"skipped": "needs CUDA"})
