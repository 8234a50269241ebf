"""scripts/gpu-check.sh and scripts/gpu_check.py (the prepared GPU check),
the benchmarks' --quick/--json options and JSON convention, and
scripts/setup.sh on a machine that reaches no package registry. All on CPU.

tests/data/gpu_check/synthetic-fixture/ is an OUTDIR in the format a
gpu-check run writes (stages.json, env.json, junit files, logs, benchmark
JSON). It is synthetic: no GPU run produced it, its numbers are invented and
its commit is none; its benchmark targets are computed by the benchmark
scripts' own functions (test_sample_targets_follow_the_scripts checks that
they still agree).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "gpu_check" / "synthetic-fixture"
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
import gpu_check as gc  # noqa: E402

CUDA = torch.cuda.is_available()
STAGES = ["env", "build-cuda", "build-cpu", "ext", "tests-kernels", "tests-engines", "tests-gpu",
          "bench-kernels", "bench-step", "bench-comm"]


def _stages(tmp_path, **kw):
    return {s.name: s for s in gc.stage_list(tmp_path, **kw)}


# ------------------------------------------------------------------ stage list
def test_stage_list_order_and_budget(tmp_path):
    stages = gc.stage_list(tmp_path)
    assert [s.name for s in stages] == STAGES
    assert all(s.timeout_s > 0 for s in stages)
    # every stage at its limit, plus each one's TERM -> KILL grace, fits in 9
    # minutes; a fallback (build-cpu) only gets what the others leave
    assert sum(s.timeout_s + gc.GRACE_S for s in stages if not s.only_if_not_ok) <= 9 * 60
    assert gc.BUDGET_S <= 9 * 60


def test_every_test_file_runs_in_one_stage_or_is_left_to_ci_with_a_reason(tmp_path):
    st = _stages(tmp_path)
    given = [f for s in st.values() if s.kind == "tests" for f in s.files]
    ci = gc.ci_only_test_files(REPO)
    on_disk = sorted(str(p.relative_to(REPO)) for p in
                     list(REPO.glob("tests/test_*.py")) + list(REPO.glob("bench/test_*.py")))
    assert len(given) == len(set(given)) and not set(given) & set(ci)
    assert sorted(given + list(ci)) == on_disk
    assert all(why for why in ci.values())
    # GPU-relevant first: the kernels, then the engines, then the training loop
    assert st["tests-kernels"].files[0] == "tests/test_triton_backend.py"
    assert set(st["tests-engines"].files) == {"tests/test_streams_engine.py", "tests/test_peer_engine.py"}
    assert st["tests-gpu"].files[0] == "tests/test_training_loop.py"
    assert "tests/test_extension.py" in st["tests-gpu"].files
    assert st["tests-engines"].env["TORCH_CUDA_SANITIZER"] == "1"
    assert "TORCH_CUDA_SANITIZER" not in st["tests-gpu"].env
    # the CPU harness is CI's
    for f in ("tests/test_gpu_check.py", "tests/test_comm_bench.py", "tests/test_fake_cuda.py",
              "tests/test_gpu_paths.py", "tests/test_core.py", "bench/test_bench_step.py"):
        assert f in ci, f
    for s in st.values():
        if s.kind == "tests":        # the files are what pytest is given
            assert [a for a in s.argv if a in s.files] == s.files


def test_cpu_only_tests_of_gpu_files_are_deselected_and_exist(tmp_path):
    """CI_ONLY_TESTS: each names tests that exist (pytest ignores a --deselect
    that matches nothing), and the stage of its file deselects it."""
    st = _stages(tmp_path)
    files = sorted({t.split("::")[0] for t in gc.CI_ONLY_TESTS})
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *files], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    for t, why in gc.CI_ONLY_TESTS.items():
        assert why and any(i == t or i.startswith(t + "[") for i in ids), t
        stage, = [s for s in st.values() if t.split("::")[0] in s.files]
        assert stage.argv[stage.argv.index(t) - 1] == "--deselect"


def test_new_files_are_planned_by_what_they_touch(tmp_path):
    (tmp_path / "tests").mkdir()
    files = {"test_streams_engine.py": "cuda", "test_multi_engine_io.py": "torch.cuda",
             "test_fake_cuda.py": "fake_cuda", "test_core.py": "cpu only", "reference.py": "cuda",
             "test_new_gpu_thing.py": "device='cuda'", "test_training_loop.py": "CUDA",
             "test_triton_backend.py": "cuda"}
    for name, text in files.items():
        (tmp_path / "tests" / name).write_text(text)
    assert gc.engine_test_files(tmp_path) == ["tests/test_multi_engine_io.py",
                                              "tests/test_streams_engine.py"]
    assert gc.kernel_test_files(tmp_path) == ["tests/test_triton_backend.py"]
    assert gc.other_test_files(tmp_path) == ["tests/test_training_loop.py", "tests/test_new_gpu_thing.py"]
    assert set(gc.ci_only_test_files(tmp_path)) == {"tests/test_fake_cuda.py", "tests/test_core.py"}


def test_pytest_options(tmp_path, monkeypatch):
    monkeypatch.delenv(gc.REHEARSE_ENV, raising=False)
    st = _stages(tmp_path)
    for name in ("tests-kernels", "tests-engines", "tests-gpu"):
        s = st[name]
        argv = s.argv
        assert argv[1:3] == ["-m", "pytest"]
        assert ["-p", "no:cacheprovider"] == argv[argv.index("-p"):argv.index("-p") + 2]
        assert f"--junitxml={tmp_path / s.junit}" in argv
        assert "--continue-on-collection-errors" in argv     # a broken module stops nothing else
        # serial, no plugin needed: the watchdog is tests/conftest.py's, per test
        assert "-n" not in argv and not any(a.startswith("--timeout") for a in argv)
        assert "rehearsal_plugin" not in argv
        per_test = float(s.env[gc.WATCHDOG_ENV])
        assert 0 < per_test + gc.WATCHDOG_KILL_S < s.timeout_s, name
    monkeypatch.setenv(gc.REHEARSE_ENV, "1")             # a rehearsal loads its plugin
    argv = _stages(tmp_path)["tests-gpu"].argv
    assert argv[argv.index("rehearsal_plugin") - 1] == "-p"


def test_the_watchdog_is_off_outside_the_check():
    import conftest
    if not os.environ.get(gc.WATCHDOG_ENV) and not os.environ.get("SAMPA_TEST_WATCHDOG_KILL_S"):
        assert conftest.WATCHDOG_S == 0 and not hasattr(conftest, "pytest_runtest_protocol")
        assert gc.WATCHDOG_KILL_S == conftest.WATCHDOG_KILL_S


HANGS = """
import signal, threading, time

def test_first():
    pass

def test_slow_in_python():
    time.sleep(60)

def test_hangs_in_c():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])   # as a wait inside C code
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()

def test_after_the_hang():
    pass
"""


def test_watchdog_fails_a_slow_test_and_the_stage_goes_on_after_a_hang(tmp_path, monkeypatch):
    """The per-test watchdog (tests/conftest.py) under run_stage: a test slow
    in Python fails and pytest goes on; a test hung where no signal reaches
    it ends pytest (stacks in the dump), and the stage resumes after it."""
    proj = tmp_path / "proj"
    (proj / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", proj / "tests" / "conftest.py")
    (proj / "tests" / "test_hangs.py").write_text(HANGS)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.delenv(gc.REHEARSE_ENV, raising=False)
    monkeypatch.setenv("SAMPA_TEST_WATCHDOG_KILL_S", "1")
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    files = ["tests/test_hangs.py"]
    st = gc.Stage("tests-x", 120, gc.pytest_argv(sys.executable, files, out / "junit-tests-x.xml"),
                  "hangs", kind="tests", env={gc.WATCHDOG_ENV: "1"}, junit="junit-tests-x.xml",
                  files=files)
    t0 = time.monotonic()
    rec = gc.run_stage(st, out, 120, repo=proj)
    assert time.monotonic() - t0 < 90
    hung = "tests/test_hangs.py::test_hangs_in_c"
    assert rec["hung"] == [hung] and rec["status"] == "failed" and hung in rec["reason"]
    assert "Timeout (" in (out / "tests-x.watchdog.txt").read_text() or \
        "going on without" in (out / "tests-x.log").read_text()
    res = gc.test_results(out, [rec], proj)
    assert res["files"]["tests/test_hangs.py"]["passed"] == 2          # first, after the hang
    assert res["files"]["tests/test_hangs.py"]["failed"] == 2          # slow (watchdog), hung
    assert {f["test"] for f in res["failures"]} == {hung, "tests/test_hangs.py::test_slow_in_python"}
    assert res["incomplete"] == []
    log = (out / "tests-x.log").read_text()
    assert log.count("test_first PASSED") == 1 and "test_slow_in_python FAILED" in log


def test_build_stages(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    st = _stages(tmp_path, ncpu=16, env_info={"capability": [9, 0]})
    cuda, cpu = st["build-cuda"], st["build-cpu"]
    assert cuda.argv[1:] == ["setup.py", "build_ext", "--inplace"] == cpu.argv[1:]
    assert cuda.env == {"SAMPA_FUSED_BUILD": "cuda", "MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0"}
    assert cpu.env["SAMPA_FUSED_BUILD"] == "cpu" and cpu.only_if_not_ok == "build-cuda"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")         # the caller's choice wins
    assert "TORCH_CUDA_ARCH_LIST" not in _stages(tmp_path, env_info={"capability": [9, 0]})["build-cuda"].env


def test_benchmark_stages(tmp_path):
    assert not any(s.kind == "tests" and any(f.startswith("bench/") for f in s.files)
                   for s in gc.stage_list(tmp_path))      # the scripts themselves run instead
    st = _stages(tmp_path)
    for name, script, out in (("bench-kernels", "bench/bench_kernels.py", "kernels.json"),
                              ("bench-step", "bench/bench_step.py", "step.json"),
                              ("bench-comm", "bench/bench_comm.py", "comm.json")):
        assert st[name].argv[1:] == [script, "--quick", "--json", str(tmp_path / out)]
        assert st[name].json_out == out
    assert st["bench-comm"].needs_file == "bench/bench_comm.py"     # absent: skipped, not failed


def test_default_outdir_names_the_device_and_date():
    import datetime as dt
    when = dt.datetime(2026, 12, 2, 9, 14, 5, tzinfo=dt.timezone.utc)
    out = gc.default_outdir("NVIDIA H100 80GB HBM3", when)
    assert out == REPO / "bench" / "results" / "gpu-check-nvidia-h100-80gb-hbm3-20261202-091405"


# ------------------------------------------------------------------ running stages
def _py(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_run_stages_statuses_timeouts_and_skips(tmp_path):
    pidfile = tmp_path / "child.pid"
    stages = [
        gc.Stage("good", 20, _py("print('fine')"), "ok"),
        gc.Stage("bad", 20, _py("import sys; sys.exit(3)"), "fails"),
        # a hang with a child of its own: the whole process group must go
        gc.Stage("hang", 1, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], "hangs"),
        gc.Stage("fallback", 20, _py("pass"), "only after a failure", only_if_not_ok="good"),
        gc.Stage("absent", 20, _py("pass"), "needs a file", needs_file="no/such/file.py"),
        gc.Stage("notests", 20, _py("pass"), "no files", kind="tests"),
    ]
    lines = []
    t0 = time.monotonic()
    recs = gc.run_stages(stages, tmp_path, log=lambda *a, **k: lines.append(a[0]))
    by = {r["name"]: r for r in recs}
    assert [r["name"] for r in recs] == [s.name for s in stages]
    assert by["good"]["status"] == "ok" and by["good"]["rc"] == 0
    assert "fine" in (tmp_path / "good.log").read_text()
    assert by["bad"]["status"] == "failed" and by["bad"]["rc"] == 3
    assert by["hang"]["status"] == "timeout" and by["hang"]["duration_s"] < 1 + gc.GRACE_S + 3
    assert time.monotonic() - t0 < 20
    child = int(pidfile.read_text())
    for _ in range(50):                           # the group was signalled; let it die
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hung stage's child {child} survived its stage")
    assert by["fallback"]["status"] == "skipped" and "good succeeded" in by["fallback"]["reason"]
    assert by["absent"]["status"] == "skipped" and "no/such/file.py" in by["absent"]["reason"]
    assert by["notests"]["status"] == "skipped"
    assert json.loads((tmp_path / "stages.json").read_text()) == recs
    assert any("hang: timeout" in line for line in lines)


def test_run_stages_stops_at_the_budget(tmp_path):
    stages = [gc.Stage("first", 20, _py("pass"), "runs"), gc.Stage("late", 20, _py("pass"), "no time")]
    recs = gc.run_stages(stages[:1], tmp_path, log=lambda *a, **k: None)
    recs = gc.run_stages(stages[1:], tmp_path, records=recs, log=lambda *a, **k: None,
                         started=time.monotonic() - gc.BUDGET_S + 3)
    assert [r["status"] for r in recs] == ["ok", "skipped"]
    assert "budget" in recs[1]["reason"]


def test_a_stage_never_reuses_an_earlier_runs_results(tmp_path):
    (tmp_path / "kernels.json").write_text('{"targets": {}}')
    st = gc.Stage("bench-kernels", 20, _py("import sys; sys.exit(1)"), "fails", kind="bench",
                  json_out="kernels.json", bench="kernels")
    recs = gc.run_stages([st], tmp_path, log=lambda *a, **k: None)
    assert not (tmp_path / "kernels.json").exists()
    assert "wrote no readable kernels.json" in gc.bench_results(tmp_path, recs)["kernels"]["error"]


def _writer(payload, rc=0):
    """argv of a stage that writes `payload` as JSON to the path after it, then exits rc."""
    code = f"import json, sys; json.dump({payload!r}, open(sys.argv[1], 'w')); sys.exit({rc})"
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("bench_rc", [0, 1])
def test_run_end_to_end_with_stand_in_stages(tmp_path, monkeypatch, capsys, bench_rc):
    """`run` as gpu-check.sh calls it, the real stages replaced by stand-ins:
    env first (in a temporary folder: it names the default OUTDIR), then the
    rest into OUTDIR, the summary last and the exit status from it."""
    env = {"device_name": "Fake GPU 9000", "torch": "2.11.0+cu130", "cuda": "13.0",
           "triton": "3.6.0", "capability": [9, 0]}
    planned = []

    def stand_ins(out, env_info=None, **kw):
        planned.append(env_info)
        bench = _writer({"device_name": env["device_name"],
                         "targets": {"speed": {"value": 1.5, "goal": 2.0, "cmp": "<=", "met": True}}},
                        rc=bench_rc)
        return [gc.Stage("env", 20, _writer(env) + [str(Path(out) / "env.json")], "env", kind="env"),
                gc.Stage("bench-x", 20, bench + [str(Path(out) / "x.json")], "bench", kind="bench",
                         json_out="x.json", bench="x")]
    monkeypatch.setattr(gc, "stage_list", stand_ins)
    monkeypatch.setattr(gc, "REPO", tmp_path)             # the default OUTDIR goes under it
    monkeypatch.setenv("GPU_CHECK_T0", str(time.time()))
    rc = gc.cmd_run(None)
    assert rc == bench_rc
    out, = (tmp_path / "bench" / "results").iterdir()
    assert out.name.startswith("gpu-check-fake-gpu-9000-")
    assert planned[-1] == env                              # the rest was planned from env.json
    assert {"env.json", "env.log", "meta.json", "stages.json", "x.json", "bench-x.log",
            "summary.json", "summary.txt"} <= {p.name for p in out.iterdir()}
    s = json.loads((out / "summary.json").read_text())
    assert s["device_name"] == "Fake GPU 9000" and s["capability"] == [9, 0]
    assert [(r["name"], r["status"]) for r in s["stages"]] == [
        ("env", "ok"), ("bench-x", "ok" if bench_rc == 0 else "failed")]
    assert s["benchmarks"]["x"]["targets"]["speed"]["met"] is True
    assert s["verdict"]["ok"] is (bench_rc == 0)
    assert s["total_s"] < 60
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("=" * 78) and "Fake GPU 9000" in printed


# ------------------------------------------------------------------ the rehearsal's short form
def test_rehearsal_short_form_plan_selection_and_refusals(tmp_path):
    """What CI runs of the rehearsal: with CUDA stood in for (one device), the
    stage plan, every planned test file collected with no error, and what a
    one-GPU machine must refuse in one line (or run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", gc.REHEARSE_ENV)}
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--plan", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [st["name"] for st in plan["stages"]] == STAGES
    assert plan["collection_errors"] == [] and all(n > 0 for n in plan["collected"].values())
    assert plan["collected"]["tests/test_triton_backend.py"] >= 30
    assert plan["sum_of_limits_s"] <= plan["budget_s"] <= 9 * 60
    assert {c["check"]: c["ok"] for c in plan["refusals"]} == dict.fromkeys(
        [c["check"] for c in plan["refusals"]], True) and len(plan["refusals"]) == 4
    assert p.stdout.rstrip().endswith("plan: OK")


def test_rehearsal_stand_in_cuda(tmp_path):
    """scripts/rehearse/sitecustomize.py: torch says CUDA with one device; the
    first real use raises the rehearsal's error, which its plugin reads as
    "needs the real GPU"."""
    code = textwrap.dedent("""
        import torch
        print(torch.cuda.is_available(), torch.cuda.device_count())
        try:
            torch.zeros(1, device="cuda")
        except Exception as e:
            print("RAISED", e)
    """)
    env = gc.rehearsal_environ({k: v for k, v in os.environ.items() if k != gc.REHEARSE_ENV})
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    first, raised = p.stdout.splitlines()[:2]
    assert first == "True 1" and raised.startswith("RAISED")
    sys.path.insert(0, str(gc.REHEARSE_DIR))
    import real_cuda
    assert real_cuda.needs_real_gpu("x\n" + raised + "\ny") == raised
    assert real_cuda.needs_real_gpu("AssertionError: 3 != 4") is None
    # without the variable nothing is stood in for
    env.pop(gc.REHEARSE_ENV)
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.stdout.strip() == str(CUDA)


def test_main_job_without_cuda_runs_cpu_ranks():
    env = dict(os.environ, MAIN_JOB_DRY_RUN="1", PYTHON=sys.executable)
    env.pop(gc.REHEARSE_ENV, None)
    p = subprocess.run(["bash", str(REPO / "scripts" / "main-job.sh"), "--epochs", "3"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.replace("\\", "")
    if CUDA:
        assert "--device cuda --engine streams --methods sgd,sam,sampa-0,sampa-0.2" in cmd
    else:
        assert "--device cpu --threads 1 --methods sgd,sam,sam@2t,sam@2p,sampa-0@2p,sampa-0.2@2p" in cmd
    assert cmd.rstrip().endswith("--epochs 3")


# ------------------------------------------------------------------ exit 2 without CUDA
@pytest.mark.skipif(CUDA, reason="the exit-2 path needs a machine without CUDA")
def test_exit_2_without_cuda(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not out.exists()                       # nothing was run, nothing written


def test_exit_2_when_torch_is_missing(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "torch.py").write_text("raise ImportError('no torch here (hidden by the test)')\n")
    env = dict(os.environ, PYTHONPATH=str(hide), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no torch here" in lines[0], lines


# ------------------------------------------------------------------ summary of a recorded run
@pytest.fixture
def sample(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(SAMPLE, out)
    return out


def test_summary_of_a_recorded_run(sample):
    s = gc.summarize(sample)
    assert (s["device_name"], s["torch"], s["triton"], s["cuda"]) == \
        ("NVIDIA H100 80GB HBM3", "2.11.0+cu130", "3.6.0", "13.0")
    assert s["date"] == "2026-12-02T09:14:05+00:00" and s["capability"] == [9, 0]
    assert s["extension"] == {"built": "cuda", "loads": True, "has_cuda": True,
                              "path": "sampa_fused/_C.cpython-312-x86_64-linux-gnu.so", "error": None}
    assert [(r["name"], r["status"]) for r in s["stages"]] == [
        ("env", "ok"), ("build-cuda", "ok"), ("build-cpu", "skipped"), ("ext", "ok"),
        ("tests-engines", "failed"), ("tests", "failed"), ("bench-tests", "timeout"),
        ("bench-kernels", "ok"), ("bench-step", "ok"), ("bench-comm", "failed")]
    assert s["stage_durations_s"]["build-cuda"] == 71.6

    files = s["tests"]["files"]
    count = lambda f: tuple(files[f][k] for k in gc.OUTCOMES)  # noqa: E731
    assert count("tests/test_streams_engine.py") == (6, 1, 1, 0)
    assert count("tests/test_peer_engine.py") == (3, 0, 2, 1)
    assert count("tests/test_triton_backend.py") == (3, 1, 1, 0)
    assert count("tests/test_user_patterns.py") == (0, 0, 0, 1)        # a collection error
    assert files["tests/test_core.py"]["source"] == "junit"
    # bench-tests was killed before pytest wrote its junit file: counted from its log
    assert count("bench/test_bench_kernels.py") == (3, 0, 0, 0)
    assert count("bench/test_bench_step.py") == (1, 1, 0, 0)
    assert count("bench/test_bench_comm.py") == (0, 0, 1, 0)
    assert files["bench/test_bench_step.py"]["source"] == "log"
    assert count("tests/test_errors.py") == (None,) * 4                 # given, nothing reported
    assert s["tests"]["totals"] == {"passed": 24, "failed": 3, "skipped": 6, "errors": 2}
    inc, = s["tests"]["incomplete"]
    assert inc["stage"] == "bench-tests" and inc["running"] == [
        "bench/test_bench_comm.py::test_bench_peer_step_resnet56[overlap]",
        "bench/test_bench_step.py::test_smoke_run_writes_json_and_chart"]
    fails = {f["test"]: f for f in s["tests"]["failures"]}
    race = fails["tests/test_streams_engine.py::test_passes_run_on_two_streams"]
    assert race["outcome"] == "failed" and "CUDASanitizerErrors" in race["message"]
    assert race["stage"] == "tests-engines"
    assert fails["tests/test_peer_engine.py::test_link_copies_ranges_exactly[True-pair0]"]["outcome"] == "error"

    k, st, comm = (s["benchmarks"][b] for b in ("kernels", "step", "comm"))
    assert k["targets"]["bandwidth_sgd_pre_fraction_of_copy"]["met"] is True
    assert k["targets"]["bandwidth_adamw_post_fraction_of_copy"]["met"] is False
    assert k["targets"]["bandwidth_check_fraction_of_copy"]["value"] == pytest.approx(0.862)
    assert k["targets"]["resnet56_fused_speedup_vs_loop"]["value"] == pytest.approx(4105 / 95.2)
    g = st["targets"]["resnet56_sampa_streams_graph_vs_sam_graph"]
    assert g["value"] == pytest.approx(7.12 / 12.03) and g["goal"] == 0.6 and g["met"] is True
    oom = st["targets"]["wrn28_10_sampa_streams_graph_vs_sampa_serial"]
    assert oom["value"] is None and oom["met"] is None and "OutOfMemoryError" in oom["note"]
    assert comm["json"] is None and "rc 2" in comm["error"] and "bench-comm.log" in comm["error"]
    v = s["verdict"]
    assert v["ok"] is False
    assert v["failed_stages"] == ["tests-engines", "tests", "bench-tests", "bench-comm"]
    assert (v["targets_met"], v["targets_not_met"], v["targets_not_measured"]) == (10, 2, 1)


def test_summary_files_and_text(sample):
    s = gc.summarize(sample)
    gc.write_summary(sample, s)
    assert json.loads((sample / "summary.json").read_text()) == json.loads(json.dumps(s))
    text = (sample / "summary.txt").read_text()
    assert text == gc.format_summary(s) + "\n"
    assert len(text) < 12_000                     # fits in a device run's output tail
    lines = text.splitlines()
    row = lambda start: next(ln for ln in lines if ln.startswith(start)).split()  # noqa: E731
    assert row("tests/test_streams_engine.py")[1:5] == ["6", "1", "1", "0"]
    assert row("total")[1:5] == ["24", "3", "6", "2"]
    assert row("kernels bandwidth_adamw_post_fraction_of_copy")[2:] == ["0.884", ">=", "0.9", "NO"]
    assert row("step resnet56_sampa_streams_graph_vs_sgd")[-1] == "yes"
    assert row("bench-tests")[1:3] == ["timeout", "124"]
    assert any("still running: bench/test_bench_comm.py::test_bench_peer_step_resnet56[overlap]" in ln
               for ln in lines)
    verdict = next(ln for ln in lines if ln.startswith("verdict:"))
    assert verdict.startswith("verdict: NOT OK; stages failed: tests-engines, tests, bench-tests, bench-comm")
    assert "targets 10 met, 2 not met, 1 not measured" in verdict


def test_summarize_command_rewrites_the_summary(sample):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "summarize", str(sample)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1                          # the recorded run has failures
    assert "verdict: NOT OK" in p.stdout and (sample / "summary.json").exists()


def test_an_empty_outdir_is_not_ok(tmp_path):
    s = gc.summarize(tmp_path)
    assert s["verdict"]["ok"] is False and s["stages"] == []
    assert "verdict: NOT OK" in gc.format_summary(s)


def test_sample_targets_follow_the_scripts():
    """The recorded benchmark JSON holds what the scripts' own target
    functions make of its measurements, in the convention's shape."""
    import bench_kernels
    import bench_step
    k = json.loads((SAMPLE / "kernels.json").read_text())
    assert k["targets"] == bench_kernels.targets(k["kernels"], k["steps"], gpu=True)
    st = json.loads((SAMPLE / "step.json").read_text())
    assert st["targets"] == bench_step.check_targets(st)
    for data in (k, st):
        for key in ("device_name", "torch", "triton", "cuda"):
            assert data[key], key
        for t in data["targets"].values():
            assert {"value", "goal", "cmp", "met"} <= set(t)


# ------------------------------------------------------------------ parsers on real pytest output
def test_junit_and_log_parsers_agree_on_real_pytest_output(tmp_path):
    proj = tmp_path / "proj"
    (proj / "tests").mkdir(parents=True)
    (proj / "tests" / "test_mix.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_fail(): assert 1 == 2, "boom"
        @pytest.mark.skip(reason="needs a CUDA device")
        def test_skip(): pass
        @pytest.fixture
        def broken(): raise RuntimeError("fixture broke")
        def test_error(broken): pass
        @pytest.mark.xfail(reason="known")
        def test_xfail(): assert 0
        @pytest.mark.parametrize("kw", [dict(a=1), "with space"])
        def test_param(kw): pass
        class TestGroup:
            def test_method(self): pass
    """))
    (proj / "tests" / "test_broken.py").write_text("import no_such_module_here\n")
    junit = tmp_path / "junit.xml"
    argv = gc.pytest_argv(sys.executable, ["tests/test_mix.py", "tests/test_broken.py"], junit)
    with open(tmp_path / "log", "w") as f:
        p = subprocess.run(argv, cwd=proj, stdout=f, stderr=subprocess.STDOUT, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
    assert p.returncode == 1
    files, fails = gc.parse_junit(junit, proj)
    assert files == {"tests/test_mix.py": {"passed": 4, "failed": 1, "skipped": 2, "errors": 1},
                     "tests/test_broken.py": {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}}
    assert {f["test"] for f in fails} == {"tests/test_mix.py::test_fail", "tests/test_mix.py::test_error",
                                          "tests/test_broken.py"}
    assert gc.junit_skip_reasons(junit)["needs a CUDA device"] == 1
    lfiles, lfails, running = gc.parse_pytest_log(tmp_path / "log")
    assert lfiles == files and running == []
    assert {f["test"] for f in lfails} == {f["test"] for f in fails}


def test_log_parser_names_the_test_that_hung(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text(textwrap.dedent("""\
        collecting ... collected 3 items

        tests/test_a.py::test_one PASSED                                          [ 33%]
        tests/test_a.py::test_two[kw1-unknown engine] SKIPPED (needs a CUDA device) [ 66%]
        tests/test_a.py::test_three[x y] Timeout (0:01:00)!
        Thread 0x00007f3a1c6fd740 (most recent call first):
          File "/repo/sampa_fused/engines/peer.py", line 412 in _wait
        """))
    files, fails, running = gc.parse_pytest_log(log)
    assert files == {"tests/test_a.py": {"passed": 1, "failed": 0, "skipped": 1, "errors": 0}}
    assert running == ["tests/test_a.py::test_three[x y]"] and fails == []


def test_targets_in_older_list_shapes_are_read():
    legacy_comm = [{"target": "link >= 90% of plain cudaMemcpyAsync", "value": 0.97, "met": True},
                   {"target": "exposed communication with overlap <= 5% of the step", "value": 0.08,
                    "met": False}]
    got = gc.normalize_targets(legacy_comm)
    assert [(t["value"], t["met"]) for t in got.values()] == [(0.97, True), (0.08, False)]
    legacy_step = [{"model": "(i) resnet56", "what": "sampa_streams_graph / sam_graph", "ratio": 0.55,
                    "limit": 0.6, "met": True}]
    t, = gc.normalize_targets(legacy_step).values()
    assert (t["value"], t["goal"], t["met"]) == (0.55, 0.6, True)
    # bench_kernels' keys before the convention were flat values: nothing to read
    assert gc.normalize_targets({"evaluated_on_gpu": False, "bandwidth_ge_90pct": None}) == {}


# ------------------------------------------------------------------ benchmark scripts
def test_bench_kernels_quick_measures_what_the_targets_need():
    import bench_kernels as bk
    args = bk.build_parser().parse_args(["--quick", "--json", "out/k.json"])
    assert args.json == "out/k.json"
    pl = bk.plan(args, "cuda")
    assert pl["sizes"] == [64_000_000] and min(pl["sizes"]) >= bk.BANDWIDTH_MIN_P
    assert pl["lists"] == ["resnet56"] and set(bk.SPEEDUP_GOALS) <= set(pl["methods"])
    full = bk.plan(bk.build_parser().parse_args([]), "cuda")
    assert len(full["sizes"]) > 1 and "100m" in full["lists"]


def test_bench_kernels_targets():
    import bench_kernels as bk
    rows = [dict(kernel=k, P=64_000_000, fraction_of_copy=0.95) for k in bk.KERNEL_PASSES]
    rows[1]["fraction_of_copy"] = 0.85
    rows.append(dict(kernel="sgd_pre", P=1_000_000, fraction_of_copy=0.1))   # below 64M: not a target
    rows.append(dict(kernel="sgd_pre", P=250_000_000, fraction_of_copy=0.91))
    steps = [dict(list="resnet56", method="fused", speedup_vs_loop=12.0, speedup_vs_foreach=1.5)]
    t = bk.targets(rows, steps, gpu=True)
    assert t["bandwidth_sgd_pre_fraction_of_copy"] == {
        "value": 0.91, "goal": 0.9, "cmp": ">=", "met": True,
        "what": t["bandwidth_sgd_pre_fraction_of_copy"]["what"]}
    assert t["bandwidth_sgd_post_fraction_of_copy"]["met"] is False
    assert t["resnet56_fused_speedup_vs_loop"]["met"] is True
    assert t["resnet56_fused_speedup_vs_foreach"]["met"] is False
    cpu = bk.targets(rows, steps, gpu=False)        # measured, but the goals are an H100's
    assert all(v["met"] is None and v["note"] for v in cpu.values())
    none = bk.targets([], [], gpu=True)
    assert all(v["value"] is None and v["met"] is None for v in none.values())


@pytest.mark.skipif(CUDA, reason="CPU (interpreter) run; on a GPU the bench-kernels stage runs it for real")
def test_bench_kernels_quick_cpu_run_writes_the_convention(tmp_path):
    out = tmp_path / "k.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "bench_kernels.py"), "--device", "cpu",
                        "--quick", "--json", str(out), "--no-plot"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device_name"] == "cpu" and data["cuda"] == torch.version.cuda
    assert data["torch"] == torch.__version__ and data["triton"] and data["quick"] is True
    assert {r["P"] for r in data["kernels"]} == {10_000} and {r["list"] for r in data["steps"]} == {"tiny"}
    assert set(data["targets"]) == set(__import__("bench_kernels").targets([], [], True))
    assert all(t["met"] is None for t in data["targets"].values())   # interpreter: n/a


def test_bench_step_quick_plan_covers_every_target():
    import bench_step as bs
    p = bs.build_parser()
    args = p.parse_args(["--quick", "--json", "s.json"])
    assert args.json == "s.json"
    pl = bs.plan(args, p, "cuda")
    runs = {m: (spec, configs, steps) for m, spec, configs, steps in pl["runs"]}
    assert set(runs) == set(bs.TARGETS) == {"resnet56", "wrn28_10"}
    assert runs["resnet56"][0].batch == 128 and runs["wrn28_10"][0].batch == 128   # WRN: 256 -> 128
    assert list(runs["resnet56"][1]) == list(bs.CONFIGS)
    for m, checks in bs.TARGETS.items():
        assert {c for num, den, _ in checks for c in (num, den)} <= set(runs[m][1]), m
    assert pl["repeats"] == bs.QUICK_REPEATS
    with pytest.raises(SystemExit):
        bs.plan(p.parse_args(["--quick"]), p, "cpu")          # the targets need a GPU
    with pytest.raises(SystemExit):
        bs.plan(p.parse_args(["--quick", "--smoke"]), p, "cuda")


def test_bench_step_targets():
    import bench_step as bs
    results = {"models": {
        "resnet56": {"batch": 128, "configs": {"sgd": {"step_ms": 10.0}, "sam_graph": {"step_ms": 12.0},
                                                "sampa_streams_graph": {"step_ms": 7.0}}},
        "wrn28_10": {"batch": 128, "configs": {"sampa_serial": {"step_ms": 60.0},
                                                "sampa_streams": {"step_ms": 61.0},
                                                "sampa_streams_graph": {"error": "OutOfMemoryError: x"}}}}}
    t = bs.check_targets(results)
    assert t["resnet56_sampa_streams_graph_vs_sam_graph"]["value"] == pytest.approx(7 / 12)
    assert t["resnet56_sampa_streams_graph_vs_sam_graph"]["met"] is True
    assert t["resnet56_sampa_streams_graph_vs_sgd"]["met"] is True
    assert t["wrn28_10_sampa_streams_vs_sampa_serial"]["met"] is False          # 61 > 60
    g = t["wrn28_10_sampa_streams_graph_vs_sampa_serial"]
    assert g["value"] is None and g["met"] is None and "OutOfMemoryError" in g["note"]
    assert bs.check_targets({"models": {"resnet8_tiny": {"batch": 8, "configs": {}}}}) == {}


def test_bench_distributed_quick_cpu_run(tmp_path):
    import bench_distributed as bd
    pl = bd.plan(bd.build_parser().parse_args(["--quick"]))
    assert pl["rounds"] == 1 and set(pl["configs"].split(",")) == {"sam_1proc", "sampa_2ranks"}
    out = tmp_path / "d.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "bench_distributed.py"), "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device_name"] == "cpu" and data["torch"] == torch.__version__ and "cuda" in data
    t = data["targets"]["sampa_2ranks_vs_sam_1proc"]
    assert t["value"] > 0 and t["goal"] == bd.TARGET_RATIO and t["met"] == (t["value"] <= 0.6)
    assert out.with_suffix(".png").exists()


# ------------------------------------------------------------------ scripts/setup.sh offline
FAKE_PIP = '''\
import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
print("ERROR: Could not find a version that satisfies the requirement (fake pip: no registry)",
      file=sys.stderr)
sys.exit(1)
'''


def _built_extension():
    so = sorted((REPO / "sampa_fused").glob("_C.cpython-*.so"))
    try:
        import sampa_fused._C as C
    except ImportError:
        C = None
    if C is None or Path(C.__file__).resolve().parent != (REPO / "sampa_fused").resolve():
        pytest.skip("needs this checkout's extension built (bash scripts/setup.sh)")
    return Path(C.__file__), so


def _setup_sh_modules(script: Path):
    """The modules of setup.sh's module:package lists (TORCH, ESSENTIAL, OPTIONAL)."""
    lists = re.findall(r"^[A-Z_]+=(\([^)]*\)|\S+)", script.read_text(), re.M)
    return sorted({m for v in lists for m in re.findall(r"([A-Za-z_]\w*):[A-Za-z][\w.=<>-]*", v)})


def test_setup_sh_module_lists_are_read():
    mods = _setup_sh_modules(REPO / "scripts" / "setup.sh")
    assert {"torch", "numpy", "pytest", "setuptools", "triton", "ruff", "lightning"} <= set(mods)


@pytest.fixture
def offline(tmp_path):
    """A copy of the checkout's setup files, a `pip` that always fails (as
    with no registry) and records its calls, and a python whose
    `setup.py build_ext --inplace` records itself and installs the built
    extension (a real build takes a minute)."""
    so, _ = _built_extension()
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copytree(REPO / "sampa_fused", repo / "sampa_fused",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*.so"))
    shutil.copy(so, repo / "sampa_fused" / so.name)
    (tmp_path / "fakepip" / "pip").mkdir(parents=True)
    (tmp_path / "fakepip" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fakepip" / "pip" / "__main__.py").write_text(FAKE_PIP)
    (tmp_path / "hide").mkdir()
    # What setup.sh installs must not depend on this machine: a module of its
    # lists that does not import here is stood in for by an empty one (a
    # test hides what it wants missing), as if everything were installed.
    (tmp_path / "present").mkdir()
    for module in _setup_sh_modules(repo / "scripts" / "setup.sh"):
        if module != "torch" and importlib.util.find_spec(module) is None:
            (tmp_path / "present" / f"{module}.py").write_text("")
    py = tmp_path / "python"
    py.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = setup.py ]; then
            echo "$@" >> {tmp_path / 'build.log'}
            cp {so} sampa_fused/{so.name}
            exit 0
        fi
        exec {sys.executable} "$@"
        """))
    py.chmod(0o755)

    class Offline:
        root, pip_log, build_log = repo, tmp_path / "pip.log", tmp_path / "build.log"
        so_name = so.name

        def hide(self, module):
            (tmp_path / "hide" / f"{module}.py").write_text(f"raise ImportError('{module} hidden')\n")

        def run(self, on_path=True):
            paths = [tmp_path / "fakepip", tmp_path / "hide", tmp_path / "present"] + \
                ([repo] if on_path else [])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, paths)), PYTHON=str(py),
                       FAKE_PIP_LOG=str(self.pip_log))
            p = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
            self.pip_calls = self.pip_log.read_text().splitlines() if self.pip_log.exists() else []
            self.builds = self.build_log.read_text().splitlines() if self.build_log.exists() else []
            return p
    return Offline()


def test_setup_sh_calls_no_pip_when_everything_imports(offline):
    p = offline.run()
    assert p.returncode == 0, p.stderr
    assert offline.pip_calls == [] and offline.builds == []


def test_setup_sh_rebuilds_an_extension_of_another_python_in_place(offline):
    so = offline.root / "sampa_fused" / offline.so_name
    foreign = so.with_name("_C.cpython-39-x86_64-linux-gnu.so")     # copied from another machine
    so.rename(foreign)
    p = offline.run(on_path=False)                 # as on the GPU machine: not installed there
    assert p.returncode == 0, p.stderr
    assert offline.builds == ["setup.py build_ext --inplace"] and offline.pip_calls == []
    assert "_C.cpython-39" in p.stderr and "does not import" in p.stderr
    assert so.exists()


def test_setup_sh_fresh_checkout_tries_the_editable_install_then_builds_in_place(offline):
    (offline.root / "sampa_fused" / offline.so_name).unlink()
    p = offline.run(on_path=False)
    assert p.returncode == 0, p.stderr
    assert offline.pip_calls == [
        "install -q --disable-pip-version-check --no-build-isolation --no-deps -e ."]
    assert offline.builds == ["setup.py build_ext --inplace"]
    assert "building in place instead" in p.stderr


def test_setup_sh_names_what_is_missing_when_pip_fails(offline):
    offline.hide("ninja")            # nothing else imports it (lightning imports tqdm)
    p = offline.run()
    assert p.returncode == 0, p.stderr             # optional: goes on without it
    assert offline.pip_calls == ["install -q --disable-pip-version-check ninja"]
    assert "registry" in p.stderr and "optional: ninja" in p.stderr
    offline.hide("pytest")
    p = offline.run()
    assert p.returncode == 1
    assert "NEEDED: pytest" in p.stderr and "optional: ninja" in p.stderr
    assert offline.pip_calls[-1] == "install -q --disable-pip-version-check pytest ninja"


def test_setup_sh_installs_the_cpu_torch_when_torch_is_missing(offline):
    offline.hide("torch")
    p = offline.run()
    assert p.returncode == 1
    assert offline.pip_calls == ["install -q --disable-pip-version-check torch==2.13.0"]
    assert "torch==2.13.0" in p.stderr and "registry" in p.stderr
