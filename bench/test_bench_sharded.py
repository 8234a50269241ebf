"""A smoke run of bench_sharded.py (tiny model, one round, sharded SAMPa
only): the script runs its 4 ranks and writes its JSON. Timings are
reported, never asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def test_bench_sharded_quick_writes_json(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "sharded.json"
    p = subprocess.run([sys.executable, str(HERE / "bench_sharded.py"), "--quick", "--configs", "sampa_sharded",
                        "--no-chart", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    cfg = res["configs"]["sampa_sharded"]
    assert cfg["n"] == res["args"]["steps"] * res["args"]["rounds"]
    assert len(cfg["tensor_mib_by_rank"]) == 4 and all(v > 0 for v in cfg["tensor_mib_by_rank"])
    assert "loadavg_start" in res["machine"]
