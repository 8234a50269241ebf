"""bench/bench_comm.py, the nccl-tests style communication benchmark, on
gloo over loopback: 2 and 4 ranks (spawned with --nproc, and one real
torchrun launch), every op's data check, the busbw factors, the 13-column
table, a corrupted result caught, --engine-step, --quick, and clear errors
for bad flags.

Each launch runs once per module (fixtures) at small sizes and few
iterations; the whole file takes well under a minute on 2 cores. Timings
are never asserted, only their arithmetic.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_comm.py"
sys.path.insert(0, str(REPO / "bench"))
import bench_comm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

COLLECTIVES = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "alltoall",
               "sendrecv"]
# doc/PERFORMANCE.md of nccl-tests, written out (not computed by the code under test)
FACTORS = {2: {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5, "alltoall": 0.5,
               "broadcast": 1.0, "reduce": 1.0, "sendrecv": 1.0},
           4: {"all_reduce": 1.5, "reduce_scatter": 0.75, "all_gather": 0.75, "alltoall": 0.75,
               "broadcast": 1.0, "reduce": 1.0, "sendrecv": 1.0}}
SMALL = ["-b", "8", "-e", "64K", "-f", "8", "-n", "2", "-w", "1"]
# CPU ranks over gloo, said explicitly: on a one-GPU machine the default is
# NCCL, which takes one GPU per rank and so refuses 2 or 4 local ranks.
CPU = ["--device", "cpu", "--backend", "gloo"]
STEP = ["--engine-step", "--model", "resnet8_tiny", "--batch", "8", "--steps", "2", "--rounds", "2",
        "--step-warmup", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _launch(cmd, timeout=240):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    return p


def _bench(tmp: Path, name: str, *args):
    js = tmp / f"{name}.json"
    p = _launch([sys.executable, str(BENCH), *args, "--json", str(js)])
    return p, (json.loads(js.read_text()) if js.exists() else None)


def _tables(stdout: str):
    """{op: [13-column rows]} from the printed output."""
    out, cur = {}, None
    for ln in stdout.splitlines():
        if ln.startswith("# Collective test starting: "):
            cur = out.setdefault(ln.split(": ", 1)[1].strip(), [])
        elif ln.strip() and not ln.startswith("#") and cur is not None:
            cur.append(ln.split())
    return out


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("comm")


@pytest.fixture(scope="module")
def run2(tmp):
    p, js = _bench(tmp, "n2", *CPU, "--nproc", "2", "--ops", "all", *SMALL, "--plot", str(tmp / "n2.png"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, js


@pytest.fixture(scope="module")
def run4(tmp):
    p, js = _bench(tmp, "n4", *CPU, "--nproc", "4", "--ops", "all", *SMALL, "-r", "3", *STEP)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, js


@pytest.fixture(params=[2, 4])
def run(request, run2, run4):
    return request.param, (run2 if request.param == 2 else run4)


# ---------------------------------------------------------------- tables, checks, factors
def test_every_op_checks_clean(run):
    n, (p, js) = run
    assert js["world_size"] == n and js["backend"] == "gloo"
    assert list(js["tables"]) == COLLECTIVES
    for op, t in js["tables"].items():
        assert len(t["rows"]) == 5, op                      # 8, 64, 512, 4K, 32K
        for r in t["rows"]:
            for half in (r["out_of_place"], r["in_place"]):
                assert half["wrong"] == 0, (op, r)
                assert half["time_us"] > 0
        assert t["out_of_bounds"] == 0
    assert "# Out of bounds values : 0 OK" in p.stdout
    assert "FAILED" not in p.stdout


def test_busbw_over_algbw_is_the_factor(run):
    n, (p, js) = run
    printed = _tables(p.stdout)
    for op, t in js["tables"].items():
        assert t["bus_factor"] == pytest.approx(FACTORS[n][op])
        for r, cols in zip(t["rows"], printed[op]):
            for half, (alg, bus) in ((r["out_of_place"], (6, 7)), (r["in_place"], (10, 11))):
                # algbw = size / time, in GB/s of 1e9 bytes
                assert half["algbw"] == pytest.approx(r["size"] / 1e9 / (half["time_us"] * 1e-6))
                assert half["busbw"] == pytest.approx(half["algbw"] * FACTORS[n][op])
                # the printed columns agree (rounded to 2 decimals)
                assert float(cols[alg]) == pytest.approx(half["algbw"], abs=0.006)
                assert float(cols[bus]) == pytest.approx(half["busbw"], abs=0.006)


def test_table_has_nccl_tests_columns(run):
    n, (p, js) = run
    out = p.stdout
    assert "#       size         count      type   redop    root     time   algbw   busbw  #wrong" \
           "     time   algbw   busbw  #wrong" in out
    assert "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)" in out
    assert sum(1 for ln in out.splitlines() if ln.startswith("#  Rank ")) == n
    printed = _tables(out)
    assert list(printed) == COLLECTIVES
    root = 3 if n == 4 else 0
    for op, rows in printed.items():
        t = js["tables"][op]
        assert [len(c) for c in rows] == [13] * len(t["rows"]), op
        for c, r in zip(rows, t["rows"]):
            assert [int(c[0]), int(c[1]), c[2]] == [r["size"], r["count"], "float"]
            # redop and root as nccl-tests prints them
            assert c[3] == {"all_gather": "none", "broadcast": "none", "alltoall": "none"}.get(op, "sum")
            assert int(c[4]) == (root if op in ("broadcast", "reduce") else -1)
            assert c[8] == c[12] == "0"
        avg = sum(h["busbw"] for r in t["rows"] for h in (r["out_of_place"], r["in_place"])) / \
            (2 * len(t["rows"]))
        assert t["avg_busbw"] == pytest.approx(avg)
    assert out.count("# Avg bus bandwidth    : ") == len(COLLECTIVES)


def test_sizes_and_counts_follow_nccl_tests(run):
    n, (p, js) = run
    t = js["tables"]
    assert [r["size"] for r in t["all_reduce"]["rows"]] == [8, 64, 512, 4096, 32768]
    assert [r["count"] for r in t["all_reduce"]["rows"]] == [2, 16, 128, 1024, 8192]
    # per-rank parts rounded down to 16 bytes: 8 B over n ranks is nothing
    ag = t["all_gather"]["rows"]
    assert (ag[0]["size"], ag[0]["count"]) == (0, 0)
    assert [(r["size"], r["count"]) for r in ag[1:]] == [(s, s // 4 // n) for s in (64, 512, 4096, 32768)]
    assert [r["size"] for r in t["alltoall"]["rows"]] == [r["size"] for r in ag]


def test_json_and_plot(run2, tmp):
    p, js = run2
    assert (tmp / "n2.png").stat().st_size > 1000
    for key in ("device_name", "torch", "triton", "cuda", "world_size", "backend", "ranks",
                "machine", "targets"):
        assert key in js
    assert js["targets"] == {}          # no CUDA here: the GPU targets are absent
    assert {r["backend"] for r in js["ranks"]} == {"gloo"} and len(js["ranks"]) == 2


# ---------------------------------------------------------------- the check can fail
def test_corrupted_result_is_counted(tmp):
    p, js = _bench(tmp, "corrupt", *CPU, "--nproc", "2", "--ops", "all_reduce,broadcast,sendrecv",
                   "-d", "int8", "-o", "max", "-b", "8", "-e", "4K", "-f", "8", "-n", "1",
                   "--corrupt", "1")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data check failed" in p.stderr
    for op, rows in _tables(p.stdout).items():
        for c in rows:        # rank 1's result is checked in every one of these ops
            assert int(c[8]) > 0 and int(c[12]) > 0, (op, c)
    assert all(t["out_of_bounds"] == 2 * len(t["rows"]) for t in js["tables"].values())
    assert "Out of bounds values : 8 FAILED" in p.stdout


def test_pattern_reductions_are_exact():
    """The reference values: every dtype and op of the -d/-o flags, 2..64 ranks."""
    for dtype in bench_comm.DTYPES.values():
        for op in ("sum", "prod", "min", "max"):
            for n in (2, 5, 64):
                vals = [bench_comm.pattern(r, 1000, 7, 1, op, dtype, n, "cpu") for r in range(n)]
                want = bench_comm.reduce_values(vals, op, n, dtype)
                # the same reduction done in the type itself, in another order
                got = vals[-1].to(dtype)
                for v in reversed(vals[:-1]):
                    v = v.to(dtype)
                    got = {"sum": torch.add, "prod": torch.mul, "min": torch.minimum,
                           "max": torch.maximum}[op](got, v)
                assert bench_comm.count_wrong(got, want, op) == 0, (dtype, op, n)
                bad = got.clone()
                bench_comm.corrupt_one(bad)          # what --corrupt does
                assert bench_comm.count_wrong(bad, want, op) == 1


# ---------------------------------------------------------------- engine step, launches
def test_engine_step_4_ranks(run4):
    p, js = run4
    d = js["engine_step"]["distributed"]
    assert d["ranks"] == 4 and d["exchange"] == "all_reduce"
    assert d["step_ms"] > 0 and d["no_exchange_ms"] > 0
    assert d["exposed_ms"] == pytest.approx(d["step_ms"] - d["no_exchange_ms"])
    assert d["exposed_pct"] == pytest.approx(100 * d["exposed_ms"] / d["step_ms"])
    assert d["gradient_bytes"] == 4 * d["params"]
    # both gradient buffers all-reduced; a ring sends 2(n-1)/n of that from each rank
    assert d["bytes_sent_per_rank_per_step"] == 3 * d["gradient_bytes"]
    # opt.engine.exchange = False really skips the exchange
    assert d["replicas_identical_with_exchange"] is True
    assert d["replicas_identical_without_exchange"] is False
    assert "skipped" in js["engine_step"]["peer"] or torch.cuda.is_available()
    assert "# Engine step: SAMPa" in p.stdout and "distributed" in p.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not found")
def test_torchrun_launch_with_engine_step(tmp):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    js_path = tmp / "torchrun.json"
    p = _launch([torchrun, "--standalone", "--nproc-per-node", "2", str(BENCH), *CPU,
                 "--ops", "all_reduce,reduce_scatter,sendrecv", "-d", "bfloat16", "-o", "prod",
                 "-b", "8", "-e", "4K", "-f", "8", "-n", "2", *STEP, "--json", str(js_path)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    js = json.loads(js_path.read_text())
    assert js["world_size"] == 2
    printed = _tables(p.stdout)
    assert list(printed) == ["all_reduce", "reduce_scatter", "sendrecv"]
    for op, rows in printed.items():
        assert rows and all(len(c) == 13 and c[2] == "bfloat16" and c[3] == "prod" and
                            c[8] == c[12] == "0" for c in rows), (op, rows)
    d = js["engine_step"]["distributed"]
    assert d["exchange"] == "send/recv" and d["bytes_sent_per_rank_per_step"] == d["gradient_bytes"]
    assert d["replicas_identical_with_exchange"] and not d["replicas_identical_without_exchange"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA --quick is the GPU check's")
def test_quick_without_cuda_runs_the_gloo_path(tmp):
    p, js = _bench(tmp, "quick", "--quick")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert js["world_size"] == 2 and list(js["tables"]) == ["all_reduce", "sendrecv"]
    assert js["engine_step"]["distributed"]["step_ms"] > 0
    assert js["targets"] == {}
    for key in ("device_name", "torch", "triton", "cuda"):
        assert key in js


# ---------------------------------------------------------------- flags
def test_sizes_and_formats():
    ps = bench_comm.parse_size
    assert [ps("8"), ps("64K"), ps("16m"), ps("1G"), ps("1.5K")] == [8, 65536, 16 << 20, 1 << 30, 1536]
    for bad in ("8B", "x", "-1", "1T"):
        with pytest.raises(Exception, match="invalid size"):
            ps(bad)
    # nccl-tests' getFloatStr, then its %7s / %6s fields
    f = bench_comm.float_str
    assert [f(12.25, 7), f(12345.678, 7), f(123456.7, 7), f(2.5e9, 7), f(1234.5, 6)] == \
        ["  12.25", "12345.7", " 123457", "2.5e+09", "1234.5"]
    assert bench_comm.coll_counts("all_gather", 1 << 20, 2, 3) == (174760, 524280, 174760)


@pytest.mark.parametrize("argv, message", [
    (["-b", "8x"], "invalid size"),
    (["-b", "1M", "-e", "8"], "minbytes"),
    (["--ops", "all_reduce,allreduce"], "unknown op"),
    (["-a", "4"], "between 0 and 3"),
    (["-d", "float8"], "invalid choice"),
    (["-f", "0"], "stepfactor"),
    (["-b", "8", "-e", "64", "-f", "1", "-i", "0"], "stepbytes"),
    (["--ops", "all_reduce", "-d", "int32", "-o", "avg", "--backend", "gloo"], "no avg for integer"),
    (["--model", "resnet9000"], "choose among"),
])
def test_bad_flags_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_comm.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv, message", [
    (["--backend", "nccl"], "needs CUDA"),
    (["--ops", "peer_copy"], "has none"),
])
def test_cuda_flags_without_cuda(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_comm.main(argv)
    assert message in capsys.readouterr().err


def test_cpu_ranks_on_a_one_gpu_machine(monkeypatch, capsys):
    """With CUDA present (one device) the default backend is NCCL, one GPU per
    rank: 4 local ranks are refused in one line that names --device cpu, and
    --device cpu runs them on gloo as on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ap = bench_comm.build_parser()
    args = ap.parse_args(["--nproc", "4", "--ops", "all_reduce"])
    with pytest.raises(SystemExit):
        bench_comm.finish_args(args, ap, bench_comm.uses_cuda(args))
    assert "NCCL needs one GPU per rank" in capsys.readouterr().err
    args = ap.parse_args(["--nproc", "4", "--ops", "all_reduce", "--device", "cpu"])
    assert bench_comm.uses_cuda(args) is False
    bench_comm.finish_args(args, ap, bench_comm.uses_cuda(args))
    assert args.backend == "gloo"
    args = ap.parse_args(["--device", "cpu", "--backend", "nccl"])
    with pytest.raises(SystemExit):
        bench_comm.finish_args(args, ap, bench_comm.uses_cuda(args))
    assert "--device cpu was given" in capsys.readouterr().err


def test_nproc_under_torchrun_is_refused(monkeypatch, capsys):
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit):
        bench_comm.main(["--nproc", "2"])
    assert "--nproc-per-node" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([*CPU, "--nproc", "2", "--ops", "broadcast", "-r", "2"], "-r/--root 2 is not a rank of this 2-rank run"),
    (["--ops", "sendrecv"], "sendrecv needs at least 2 ranks"),
])
def test_world_errors_are_refused_before_any_rank_starts(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_comm.main(argv)
    assert message in capsys.readouterr().err
