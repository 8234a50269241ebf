#!/usr/bin/env python3
"""The Python side of scripts/gpu-check.sh: one prepared check of the project
on a GPU machine (rebuild, the GPU-relevant tests, the quick benchmarks), at
most 9 minutes of wall time, ending with one summary.

    bash scripts/gpu-check.sh [OUTDIR]             # checks for CUDA, then `run`
    python scripts/gpu_check.py rehearse OUTDIR    # the check on CPU, CUDA stood in for
    python scripts/gpu_check.py plan OUTDIR        # the rehearsal's short form (CI)
    python scripts/gpu_check.py stages [OUTDIR]    # the stage list with its timeouts; runs nothing
    python scripts/gpu_check.py summarize OUTDIR   # summary.json / summary.txt again from OUTDIR
    python scripts/gpu_check.py run [OUTDIR]       # the check itself (gpu-check.sh calls this)

A rehearsal sets SAMPA_GPU_CHECK_REHEARSE=1, TRITON_INTERPRET=1 and puts
scripts/rehearse/ first on PYTHONPATH: its sitecustomize.py makes torch
report one CUDA device in every process, its pytest plugin turns a test's
use of the real GPU into a skip that says so, and the summary counts what
still fails as environment failures; a stage that stops on the real GPU
(a benchmark) shows as "gpu-only".

Every stage runs under `timeout` (SIGTERM to its whole process group, SIGKILL
GRACE_S later), and the stages together under BUDGET_S: a hang costs its
stage's time, never the rest of the lease. Stage timeouts are budgets for an
H100/H200 with 16 cores; a stage that needs more shows as "timeout" in the
summary, with its log.

OUTDIR (default bench/results/gpu-check-<device>-<date>/) receives
<stage>.log for every stage, junit-<stage>.xml for the test stages,
kernels.json / step.json / comm.json (+ .png) from the benchmarks, env.json
(device and versions), ext.json (which extension imports), stages.json
(each stage's command, limit, duration, exit status) and, last,
summary.json and summary.txt. A device machine returns at most 8 files:
copy back `summary.json` and a tarball of OUTDIR.

This file needs only the standard library (torch is imported by the `env`
and `ext` stages, in their own processes), so the summary can be rebuilt and
tested anywhere.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 540          # the whole run: 9 minutes
GRACE_S = 2             # SIGTERM -> SIGKILL, per stage
MIN_STAGE_S = 5         # a stage with less time left than this is skipped
FORMAT = "sampa-fused-gpu-check/1"
OUTCOMES = ("passed", "failed", "skipped", "errors")


@dataclass
class Stage:
    name: str
    timeout_s: int
    argv: List[str]
    purpose: str
    kind: str = "cmd"                  # env | build | ext | tests | bench
    env: Dict[str, str] = field(default_factory=dict)
    junit: Optional[str] = None        # file name in OUTDIR (test stages)
    files: List[str] = field(default_factory=list)   # test files given to pytest
    json_out: Optional[str] = None     # file name in OUTDIR (benchmarks)
    bench: Optional[str] = None        # the benchmark's short name
    needs_file: Optional[str] = None   # skipped when this repository file is absent
    only_if_not_ok: Optional[str] = None  # runs only when that stage did not succeed


# --------------------------------------------------------------------------
# The stage list
#
# The GPU machine has no pytest-xdist and no pytest-timeout: every test stage
# runs serially, GPU-relevant files first, and a hung test is stopped by the
# watchdog of tests/conftest.py (SIGALRM fails the test after WATCHDOG_ENV
# seconds; faulthandler ends pytest WATCHDOG_KILL_S later if the hang is in C,
# and the stage then resumes after that test). Test files that never touch
# CUDA run the same on every machine: CI runs them, the check does not.

WATCHDOG_ENV = "SAMPA_TEST_WATCHDOG_S"
WATCHDOG_KILL_S = 10         # tests/conftest.py's default (SAMPA_TEST_WATCHDOG_KILL_S)
REHEARSE_ENV = "SAMPA_GPU_CHECK_REHEARSE"
REHEARSE_DIR = REPO / "scripts" / "rehearse"
NEEDS_REAL_GPU = "rehearsal: needs the real GPU"      # rehearsal_plugin.py's skip reason
# Files that mention CUDA but test the CPU harness (CI runs them): why each.
CI_ONLY = {
    "tests/test_gpu_check.py": "this check's own plumbing, on CPU",
    "tests/test_comm_bench.py": "bench_comm.py's gloo ranks on CPU (bench-comm runs the CUDA part)",
    "tests/test_fake_cuda.py": "the CUDA stand-in itself, on CPU",
    "tests/test_cuda_ordering.py": "stream ordering against a stub libcudart, on CPU",
    "tests/test_kernels_aot.py": "ptxas on the host: the same result on any machine",
    "tests/test_gpu_paths.py": "the GPU paths' code under the CUDA stand-in, on CPU tensors",
}
# Tests inside GPU-relevant files that run on CPU by construction (CI runs
# them; the check deselects them): node id prefixes, and why.
CI_ONLY_TESTS = {
    "tests/test_train.py::test_compare_launches_ranks_itself_and_equals_torchrun_semantics":
        "@Np: CPU ranks over gloo (--device cpu)",
    "tests/test_train.py::test_cli_refuses_bad_arguments_in_one_line_before_training":
        "argument refusals before any training, in CPU subprocesses",
}
KERNEL_FIRST = ["tests/test_triton_backend.py"]                  # the GPU kernels
GPU_FIRST = ["tests/test_training_loop.py", "tests/test_gpu_paths.py", "tests/test_extension.py"]


def _rel(repo: Path, paths) -> List[str]:
    return sorted(str(p.relative_to(repo)) for p in paths)


def _touches_cuda(path: Path) -> bool:
    try:
        return "cuda" in path.read_text(errors="replace").lower()
    except OSError:
        return False


def ci_only_test_files(repo: Path) -> Dict[str, str]:
    """{file: why} for the test files the check leaves to CI."""
    out = {}
    for f in _rel(repo, repo.glob("tests/test_*.py")):
        if f in CI_ONLY:
            out[f] = CI_ONLY[f]
        elif not _touches_cuda(repo / f):
            out[f] = "never touches CUDA: runs the same on CPU"
    for f in _rel(repo, repo.glob("bench/test_*.py")):
        out[f] = "the bench-* stages run the benchmark scripts themselves"
    return out


def engine_test_files(repo: Path) -> List[str]:
    """The engine tests, run under TORCH_CUDA_SANITIZER=1: the streams and peer
    engines (graphs included) and any other tests/test_*engine*.py."""
    ci = ci_only_test_files(repo)
    return [f for f in _rel(repo, repo.glob("tests/test_*engine*.py")) if f not in ci]


def kernel_test_files(repo: Path) -> List[str]:
    return [f for f in KERNEL_FIRST if (repo / f).exists()]


def other_test_files(repo: Path) -> List[str]:
    """Every other GPU-relevant test file, the training loop first."""
    taken = set(engine_test_files(repo)) | set(kernel_test_files(repo)) | set(ci_only_test_files(repo))
    rest = [f for f in _rel(repo, repo.glob("tests/test_*.py")) if f not in taken]
    return [f for f in GPU_FIRST if f in rest] + [f for f in rest if f not in GPU_FIRST]


def rehearsing() -> bool:
    return os.environ.get(REHEARSE_ENV) == "1"


def pytest_argv(python: str, files: List[str], junit: Path, extra: Iterable[str] = ()) -> List[str]:
    """-v prints each test's outcome as it ends: when a stage is killed before
    pytest writes its junit file, the log still says what ran (and what hung).
    The per-test watchdog is tests/conftest.py's (WATCHDOG_ENV in the stage's
    environment); a rehearsal loads its plugin."""
    return [python, "-m", "pytest", *files, "-v", "-rfEs", "-p", "no:cacheprovider",
            # one broken module must not stop the others (pytest stops at
            # collection errors by default)
            "--continue-on-collection-errors",
            f"--junitxml={junit}", "-o", "junit_family=xunit1",   # xunit1: a file= per test
            "--durations=10",
            *(["-p", "rehearsal_plugin"] if rehearsing() else []), *extra]


def stage_list(out: Path, repo: Path = REPO, python: str = sys.executable,
               ncpu: Optional[int] = None, env_info: Optional[dict] = None) -> List[Stage]:
    """What `run` runs, in order. env_info (env.json) gives the compute
    capability (TORCH_CUDA_ARCH_LIST).

    Limits: at least 30% over a rehearsal's times (scripts/gpu-check.sh
    --rehearse on CPU, where tests that need the real GPU skip) plus a GPU
    machine's cold start: the extension's CUDA build (94 s cold in the stack
    check's venv on 2 busy cores) and about 25 s of Triton JIT for the
    kernels' ~180 specialisations, paid by the first stage that launches
    them. The tests that need the real GPU skip in a rehearsal: their GPU
    times are estimates until a GPU run records them."""
    env_info = env_info or {}
    ncpu = ncpu or os.cpu_count() or 2
    out = Path(out)
    me = str(Path(__file__).resolve())
    build_env = {"MAX_JOBS": str(ncpu)}
    cap = env_info.get("capability")
    if cap and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        build_env["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"   # this GPU only: a shorter build
    test_env = {"SAMPA_REQUIRE_EXT": "1"}      # the extension was just built: missing is a failure
    build = [python, "setup.py", "build_ext", "--inplace"]
    kernels, engines, others = kernel_test_files(repo), engine_test_files(repo), other_test_files(repo)

    def tests(name, limit, files, per_test_s, purpose, **env):
        junit = f"junit-{name}.xml"
        deselect = [a for t in CI_ONLY_TESTS if t.split("::")[0] in files for a in ("--deselect", t)]
        return Stage(name, limit, pytest_argv(python, files, out / junit, deselect), purpose, kind="tests",
                     env={**test_env, WATCHDOG_ENV: str(per_test_s), **env}, junit=junit,
                     files=files)
    return [
        # the first CUDA initialisation and torch import on a fresh machine can be slow
        Stage("env", 20, [python, me, "env", str(out / "env.json")],
              "device, driver, torch/triton/CUDA versions, pytest plugins", kind="env"),
        Stage("build-cuda", 125, build, "the CUDA extension for this Python, in place",
              kind="build", env={"SAMPA_FUSED_BUILD": "cuda", **build_env}),
        Stage("build-cpu", 80, build, "fallback: the C++ extension only (the CUDA build failed)",
              kind="build", env={"SAMPA_FUSED_BUILD": "cpu", **build_env},
              only_if_not_ok="build-cuda"),
        Stage("ext", 10, [python, me, "ext", str(out / "ext.json")],
              "which extension imports (CUDA or C++ only)", kind="ext"),
        tests("tests-kernels", 75, kernels, 60,
              "the Triton kernels on CUDA (pays the JIT cold start)"),
        tests("tests-engines", 55, engines, 40,
              "streams (graphs too) and peer engines under the CUDA sanitizer",
              TORCH_CUDA_SANITIZER="1"),
        tests("tests-gpu", 90, others, 45,
              "the training loop on CUDA, then the other tests that touch CUDA"),
        Stage("bench-kernels", 50,
              [python, "bench/bench_kernels.py", "--quick", "--json", str(out / "kernels.json")],
              "kernel bandwidth (P = 64M) and the ResNet-56 elementwise step", kind="bench",
              json_out="kernels.json", bench="kernels"),
        Stage("bench-step", 55,
              [python, "bench/bench_step.py", "--quick", "--json", str(out / "step.json")],
              "step times: ResNet-56 batch 128, WRN-28-10 batch 128", kind="bench",
              json_out="step.json", bench="step"),
        Stage("bench-comm", 30,
              [python, "bench/bench_comm.py", "--quick", "--json", str(out / "comm.json")],
              "peer copies and the peer-engine step", kind="bench", json_out="comm.json",
              bench="comm", needs_file="bench/bench_comm.py"),
    ]


def stage_env(stage: Stage, repo: Path = REPO) -> Dict[str, str]:
    env = dict(os.environ)
    # the checkout, not an installed copy of another one; logs as they happen
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(stage.env)
    return env


# --------------------------------------------------------------------------
# Running

def _run_logged(argv: List[str], env: Dict[str, str], log: Path, limit: int, repo: Path,
                grace_s: int, header: str):
    """argv under `timeout` (its whole process group killed at the limit),
    output appended to log. Returns (rc, duration_s, timed_out)."""
    use_timeout = shutil.which("timeout") is not None
    full = (["timeout", "-k", str(grace_s), str(limit)] if use_timeout else []) + argv
    start = time.monotonic()
    timed_out = False
    with open(log, "ab") as f:
        f.write(header.encode())
        f.flush()
        try:
            # its own session: the backstop below can kill everything it started
            proc = subprocess.Popen(full, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise _NotStarted(str(e)) from None
        try:
            rc = proc.wait(timeout=limit + grace_s + 5)
        except subprocess.TimeoutExpired:       # `timeout` missing or stuck itself
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    duration = time.monotonic() - start
    if not timed_out and use_timeout and rc in (124, 137) and duration >= limit - 1:
        timed_out = True                        # 124: TERM worked; 137: needed the KILL
    return rc, duration, timed_out


class _NotStarted(Exception):
    pass


_HUNG = re.compile(r"^Timeout \(\d+:\d\d:\d\d(?:\.\d+)?\)!", re.M)


def watchdog_hung(dump: Path) -> Optional[str]:
    """The test the conftest watchdog ended pytest in, from its dump file
    (each test's id is written there as it starts), else None."""
    try:
        text = dump.read_text(errors="replace")
    except OSError:
        return None
    m = _HUNG.search(text)
    if not m:
        return None
    named = re.findall(r"^watchdog: (\S.*)$", text[:m.start()], re.M)
    return named[-1] if named else "?"


def run_stage(stage: Stage, outdir: Path, limit_s: float, repo: Path = REPO,
              grace_s: int = GRACE_S) -> dict:
    """Run one stage under `timeout`, its output in OUTDIR/<name>.log. A test
    stage that the per-test watchdog ended (a test hung in C code) goes on
    after that test while time is left: one hang costs one test."""
    outdir = Path(outdir)
    log = outdir / f"{stage.name}.log"
    limit = max(1, int(limit_s))
    rec = {"name": stage.name, "purpose": stage.purpose, "kind": stage.kind,
           "cmd": " ".join(f"{k}={shlex.quote(v)}" for k, v in stage.env.items())
                  + (" " if stage.env else "") + shlex.join(stage.argv),
           "timeout_s": stage.timeout_s, "limit_s": limit, "log": log.name}
    for key in ("junit", "json_out", "bench"):
        if getattr(stage, key):
            rec[key] = getattr(stage, key)
    if stage.files:
        rec["files"] = list(stage.files)
    for name in (stage.junit, stage.json_out):      # no stale results from an earlier run
        if name:
            for stale in (outdir / name, (outdir / name).with_suffix(".png")):
                stale.unlink(missing_ok=True)
    env = stage_env(stage, repo)
    dump = None
    if stage.kind == "tests" and WATCHDOG_ENV in stage.env:
        dump = outdir / f"{stage.name}.watchdog.txt"
        dump.unlink(missing_ok=True)
        env["SAMPA_TEST_WATCHDOG_DUMP"] = str(dump)
    log.unlink(missing_ok=True)
    argv, hung, total, header = list(stage.argv), [], 0.0, f"$ {rec['cmd']}\n# limit {limit} s\n"
    while True:
        try:
            rc, took, timed_out = _run_logged(argv, env, log, max(1, int(limit - total)), repo,
                                              grace_s, header)
        except _NotStarted as e:
            rec.update(status="failed", rc=None, duration_s=round(total, 1),
                       reason=f"could not start: {e}")
            return rec
        total += took
        which = watchdog_hung(dump) if dump is not None and not timed_out else None
        if which is None or which in hung:
            break
        hung.append(which)
        # Go on after the hung test: every test that reported, and it, deselected.
        done, _, _ = parse_pytest_log_outcomes(log)
        if limit - total < MIN_STAGE_S:
            break
        argv = list(stage.argv) + [a for n in list(done) + hung for a in ("--deselect", n)]
        dump.write_text("")         # a fresh dump for the next attempt
        header = (f"\n# the watchdog ended pytest in {which}; going on without the "
                  f"{len(done) + len(hung)} tests that ran\n")
    rec.update(rc=rc, duration_s=round(total, 1))
    if hung:
        rec["hung"] = hung
        if stage.junit:          # the last attempt's junit covers only its own tests
            (outdir / stage.junit).unlink(missing_ok=True)
    if timed_out:
        rec.update(status="timeout", reason=f"killed after its {limit} s limit")
    elif rc == 0 and not hung:
        rec["status"] = "ok"
    else:
        rec["status"] = "failed"
        if hung:
            rec["reason"] = "the watchdog stopped " + ", ".join(hung)
        elif rc is not None and rc < 0:
            rec["reason"] = f"killed by signal {-rc}"
        elif stage.kind == "tests" and rc in PYTEST_RC:
            rec["reason"] = PYTEST_RC[rc]
    return rec


PYTEST_RC = {1: "some tests failed", 2: "interrupted", 3: "pytest internal error",
             4: "pytest usage error", 5: "no tests collected"}


def skip_record(stage: Stage, reason: str) -> dict:
    return {"name": stage.name, "purpose": stage.purpose, "kind": stage.kind,
            "cmd": shlex.join(stage.argv), "timeout_s": stage.timeout_s, "status": "skipped",
            "rc": None, "duration_s": 0.0, "reason": reason,
            **{k: getattr(stage, k) for k in ("junit", "json_out", "bench") if getattr(stage, k)},
            **({"files": list(stage.files)} if stage.files else {})}


def run_stages(stages: List[Stage], outdir: Path, repo: Path = REPO, budget_s: float = BUDGET_S,
               log=print, records: Optional[List[dict]] = None,
               started: Optional[float] = None) -> List[dict]:
    """Run the stages in order within budget_s (counted from `started`),
    writing OUTDIR/stages.json after each one."""
    outdir = Path(outdir)
    start = time.monotonic() if started is None else started
    records = [] if records is None else records
    for stage in stages:
        status = {r["name"]: r["status"] for r in records}
        left = budget_s - (time.monotonic() - start) - GRACE_S
        if stage.only_if_not_ok:
            # A fallback uses slack only: the stages after it keep their limits.
            later = stages[stages.index(stage) + 1:]
            left -= sum(s.timeout_s + GRACE_S for s in later if not s.only_if_not_ok)
        if stage.only_if_not_ok and status.get(stage.only_if_not_ok) == "ok":
            rec = skip_record(stage, f"{stage.only_if_not_ok} succeeded")
        elif stage.needs_file and not (repo / stage.needs_file).exists():
            rec = skip_record(stage, f"{stage.needs_file} is not in this checkout")
        elif stage.kind == "tests" and not stage.files:
            rec = skip_record(stage, "no test files")
        elif left < MIN_STAGE_S:
            rec = skip_record(stage, f"only {max(left, 0):.0f} s left of the {budget_s:.0f} s budget"
                              + (" after the later stages' limits" if stage.only_if_not_ok else ""))
        else:
            log(f"[{time.monotonic() - start:5.0f} s] {stage.name}: {stage.purpose} "
                f"(limit {min(stage.timeout_s, int(left))} s)", flush=True)
            rec = run_stage(stage, outdir, min(stage.timeout_s, left), repo)
        records.append(rec)
        log(f"[{time.monotonic() - start:5.0f} s] {stage.name}: {rec['status']}"
            + (f" (rc {rec['rc']})" if rec.get("rc") not in (None, 0) else "")
            + (f" - {rec['reason']}" if rec.get("reason") else ""), flush=True)
        (outdir / "stages.json").write_text(json.dumps(records, indent=1))
    return records


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_outdir(device_name: str, now: Optional[_dt.datetime] = None) -> Path:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return REPO / "bench" / "results" / f"gpu-check-{slug(device_name)}-{now:%Y%m%d-%H%M%S}"


def git_info(repo: Path = REPO) -> dict:
    def git(*args):
        try:
            p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout.strip() if p.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cmd_run(outdir_arg: Optional[str]) -> int:
    started = time.monotonic()
    try:                # gpu-check.sh's start: its CUDA probe counts against the budget too
        started -= max(0.0, time.time() - float(os.environ["GPU_CHECK_T0"]))
    except (KeyError, ValueError):
        pass
    date = _dt.datetime.now(_dt.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env_stage = stage_list(tmp)[0]
    # The device name names the default OUTDIR: the env stage runs first, in a
    # temporary folder, and its files move into OUTDIR.
    records = run_stages([env_stage], tmp, started=started)
    env_info = read_json(tmp / "env.json") or {}
    outdir = Path(outdir_arg) if outdir_arg else default_outdir(env_info.get("device_name", "gpu"), date)
    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        shutil.move(str(f), outdir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if env_info:       # the paths inside it named the temporary folder
        (outdir / "env.json").write_text(json.dumps(env_info, indent=1))
    meta = {"date": date.isoformat(timespec="seconds"), "outdir": str(outdir), **git_info()}
    (outdir / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"gpu-check: writing to {outdir}", flush=True)
    stages = stage_list(outdir, env_info=env_info)[1:]
    run_stages(stages, outdir, records=records, started=started)
    summary = summarize(outdir)
    summary["total_s"] = round(time.monotonic() - started, 1)
    write_summary(outdir, summary)
    print(format_summary(summary), flush=True)
    return 0 if summary["verdict"]["ok"] else 1


# --------------------------------------------------------------------------
# Reading what the stages left

def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _file_of(case: ET.Element, repo: Path) -> str:
    """The test file of a junit testcase: xunit1's file=, else from classname
    (tests.test_core or tests.test_core.TestX) or, for a module-level
    collection error or skip, the name."""
    if case.get("file"):
        return case.get("file")
    dotted = case.get("classname") or case.get("name") or ""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        cand = "/".join(parts[:n]) + ".py"
        if (repo / cand).exists():
            return cand
    return "/".join(parts[:2]) + ".py" if len(parts) >= 2 else dotted or "?"


def _message(el: ET.Element) -> str:
    text = el.get("message") or (el.text or "")
    text = " ".join(text.split())
    return text[:200]


def parse_junit(path: Path, repo: Path = REPO):
    """({file: counts}, [failure]) from a junit XML file."""
    root = ET.parse(path).getroot()
    files: Dict[str, Dict[str, int]] = {}
    failures = []
    for case in root.iter("testcase"):
        f = _file_of(case, repo)
        counts = files.setdefault(f, dict.fromkeys(OUTCOMES, 0))
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        name = case.get("name", "?")
        node = f"{f}::{name}" if case.get("classname") else f
        if case.get("classname") and "." in case.get("classname"):
            cls = case.get("classname").rsplit(".", 1)[1]
            if cls.startswith("Test"):
                node = f"{f}::{cls}::{name}"
        if failure is not None:
            counts["failed"] += 1
            failures.append({"test": node, "outcome": "failed", "message": _message(failure)})
        elif error is not None:
            counts["errors"] += 1
            failures.append({"test": node, "outcome": "error", "message": _message(error)})
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return files, failures


# A test id: path::name, then parameters in brackets that may hold spaces
# ("test_x[kw4-unknown engine]"). -v prints "ID STATUS ... [ 5%]" (serial) or
# "ID" when a test starts and "[gw0] [  5%] STATUS ID" when it ends (xdist).
_STATUS = r"(?P<status>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_ID = r"(?P<id>\S+\.py::[^\s\[]+(?:\[.*?\])?)"
_SERIAL = re.compile(r"^" + _ID + " " + _STATUS + r"(?:\s|$)")
_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] " + _STATUS + r" (?P<id>\S+\.py::[^\s\[]+(?:\[.*\])?)\s*$")
_START = re.compile(r"^" + _ID + r"(?:\s|$)")
_COLLECT = re.compile(r"ERROR collecting (?P<file>\S+\.py)")
_RANK = {"HUNG": 4, "FAILED": 3, "ERROR": 2, "XPASS": 1, "PASSED": 1, "SKIPPED": 0, "XFAIL": 0}
_KIND = {"HUNG": "failed", "PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
         "SKIPPED": "skipped", "XFAIL": "skipped"}


def parse_pytest_log_outcomes(path: Path):
    """({test id: PASSED|FAILED|...}, [started], [files that failed to collect])
    from a `pytest -v` log."""
    outcome: Dict[str, str] = {}
    started: List[str] = []
    collect_errors = []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _XDIST.match(line) or _SERIAL.match(line)
        if m:
            node, status = m.group("id"), m.group("status")
        else:
            s = _START.match(line)
            if s:
                started.append(s.group("id"))
            c = _COLLECT.search(line)
            if c and c.group("file") not in collect_errors:
                collect_errors.append(c.group("file"))
            continue
        # a test can report twice (a teardown error after a pass): keep the worst
        if node not in outcome or _RANK[status] > _RANK[outcome[node]]:
            outcome[node] = status
    return outcome, started, collect_errors


def parse_pytest_log(path: Path, hung: Iterable[str] = ()):
    """({file: counts}, [failure], running) from a `pytest -v` log, for a
    stage that ended before pytest wrote its junit file. `running`: the tests
    that started and never reported (serial runs: the one that hung); `hung`
    (the watchdog's) count as failed."""
    outcome, started, collect_errors = parse_pytest_log_outcomes(path)
    for node in hung:
        outcome[node] = "HUNG"
    files: Dict[str, Dict[str, int]] = {}
    failures = []
    for node, status in outcome.items():
        counts = files.setdefault(node.split("::")[0], dict.fromkeys(OUTCOMES, 0))
        counts[_KIND[status]] += 1
        if status in ("FAILED", "ERROR", "HUNG"):
            failures.append({"test": node, "outcome": "error" if status == "ERROR" else "failed",
                             "message": "hung: stopped by the per-test watchdog (stacks in "
                                        "<stage>.watchdog.txt)" if status == "HUNG"
                                        else "see the stage log"})
    for f in collect_errors:
        files.setdefault(f, dict.fromkeys(OUTCOMES, 0))["errors"] += 1
        failures.append({"test": f, "outcome": "error", "message": "collection failed (see the log)"})
    running = [n for n in dict.fromkeys(started) if n not in outcome]
    return files, failures, running


def test_results(outdir: Path, records: List[dict], repo: Path = REPO) -> dict:
    """Per test file: passed/failed/skipped/errors, from each test stage's
    junit file, else (the stage was killed or crashed) from its log."""
    files: Dict[str, dict] = {}
    failures: List[dict] = []
    incomplete: List[dict] = []
    skips: Dict[str, int] = {}
    for rec in records:
        if rec.get("kind") != "tests":
            continue
        stage = rec["name"]
        got: Dict[str, Dict[str, int]] = {}
        fails: List[dict] = []
        source = None
        if rec["status"] != "skipped":
            junit = outdir / rec["junit"] if rec.get("junit") else None
            if junit is not None and junit.exists():
                try:
                    got, fails = parse_junit(junit, repo)
                    for why, n in junit_skip_reasons(junit).items():
                        skips[why] = skips.get(why, 0) + n
                    source = "junit"
                except ET.ParseError as e:
                    incomplete.append({"stage": stage, "why": f"unreadable {junit.name}: {e}"})
            if source is None:
                log = outdir / rec.get("log", f"{stage}.log")
                if not log.exists():
                    incomplete.append({"stage": stage, "why": "neither a junit file nor a log"})
                else:
                    got, fails, running = parse_pytest_log(log, rec.get("hung", ()))
                    source = "log"
                    # (resumed after a hang and finished: the log holds every test)
                    if not rec.get("hung") or rec["status"] == "timeout":
                        incomplete.append({
                            "stage": stage, "running": running,
                            "why": f"no junit file ({rec['status']}"
                                   + (f", rc {rec['rc']}" if rec.get("rc") else "")
                                   + "): counts read from the log"})
        for f, counts in got.items():
            files[f] = {**counts, "stage": stage, "source": source}
        for f in rec.get("files", []):        # given to pytest, nothing reported
            if f not in files:
                files[f] = {**dict.fromkeys(OUTCOMES, None), "stage": stage,
                            "source": "skipped stage" if rec["status"] == "skipped" else None}
        failures += [{**x, "stage": stage} for x in fails]
    totals = {k: sum(v[k] or 0 for v in files.values()) for k in OUTCOMES}
    return {"files": dict(sorted(files.items())), "totals": totals, "failures": failures,
            "incomplete": incomplete,
            "skip_reasons": dict(sorted(skips.items(), key=lambda kv: (-kv[1], kv[0])))}


def junit_skip_reasons(path: Path) -> Dict[str, int]:
    """{reason: count} of the skipped tests in a junit file ("file:line: " cut)."""
    out: Dict[str, int] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        sk = case.find("skipped")
        if sk is not None:
            why = re.sub(r"^\S+?:\d+: ", "", _message(sk)) or "?"
            if why.startswith(NEEDS_REAL_GPU):       # one group, whatever CUDA call it was
                why = NEEDS_REAL_GPU + " (skipped in the rehearsal)"
            out[why] = out.get(why, 0) + 1
    return out


def normalize_targets(raw) -> Dict[str, dict]:
    """The benchmarks' targets as {name: {value, goal, cmp, met, what, note}}.
    Takes the convention's mapping, and the lists older scripts wrote
    ({"target"|"what", "value"|"ratio", "limit", "met"})."""
    out: Dict[str, dict] = {}
    if isinstance(raw, dict):
        items = [(k, v) for k, v in raw.items() if isinstance(v, dict) and "value" in v]
    elif isinstance(raw, list):
        items = []
        for i, t in enumerate(raw):
            if isinstance(t, dict):
                name = t.get("name") or " ".join(str(t[k]) for k in ("model", "what") if t.get(k)) \
                    or t.get("target") or f"target_{i}"
                items.append((name, t))
    else:
        return out
    for name, t in items:
        value = t.get("value", t.get("ratio"))
        goal = t.get("goal", t.get("limit"))
        met = t.get("met")
        out[name] = {"value": value, "goal": goal, "cmp": t.get("cmp"),
                     "met": None if met is None else bool(met),
                     "what": t.get("what") or t.get("target"), "note": t.get("note")}
    return out


def bench_results(outdir: Path, records: List[dict]) -> Dict[str, dict]:
    out = {}
    for rec in records:
        if rec.get("kind") != "bench":
            continue
        name = rec.get("bench") or rec["name"]
        entry = {"stage": rec["name"], "status": rec["status"], "json": None, "targets": {}}
        path = outdir / rec["json_out"] if rec.get("json_out") else None
        data = read_json(path) if path is not None and path.exists() else None
        if rec["status"] == "skipped":
            entry["error"] = rec.get("reason")
        elif data is None:
            entry["error"] = (f"{rec['name']} {rec['status']}"
                              + (f" (rc {rec['rc']})" if rec.get("rc") else "")
                              + f" and wrote no readable {rec.get('json_out')}; see {rec.get('log')}")
        else:
            entry["json"] = path.name
            entry["targets"] = normalize_targets(data.get("targets"))
            for k in ("device_name", "torch", "triton", "cuda"):
                entry[k] = data.get(k)
            if not entry["targets"]:
                entry["error"] = f"{path.name} has no targets in the benchmarks' convention"
            if rec["status"] != "ok":
                entry["error"] = f"{rec['name']} {rec['status']} after writing {path.name}"
        out[name] = entry
    return out


def summarize(outdir: Path, repo: Path = REPO) -> dict:
    outdir = Path(outdir)
    records = read_json(outdir / "stages.json") or []
    env = read_json(outdir / "env.json") or {}
    ext = read_json(outdir / "ext.json") or {}
    meta = read_json(outdir / "meta.json") or {}
    tests = test_results(outdir, records, repo)
    benches = bench_results(outdir, records)
    versions = {k: env.get(k) for k in ("device_name", "torch", "triton", "cuda")}
    for b in benches.values():           # where env.json is missing, a benchmark knows
        for k, v in versions.items():
            if v is None and b.get(k):
                versions[k] = b[k]
    build = next((r["name"].split("-", 1)[1] for r in records
                  if r.get("kind") == "build" and r["status"] == "ok"), None)
    targets = [dict(benchmark=b, name=n, **t) for b, e in benches.items() for n, t in e["targets"].items()]
    met = sum(t["met"] is True for t in targets)
    not_met = sum(t["met"] is False for t in targets)
    stages_view = [dict(r) for r in records]
    if env.get("rehearsal"):
        for r in stages_view:
            why = r["status"] == "failed" and _rehearsal_cannot(outdir / r.get("log", ""))
            if why:
                r["status"], r["reason"] = "gpu-only", why
    bad_stages = [r["name"] for r in stages_view if r["status"] in ("failed", "timeout")]
    tot = tests["totals"]
    return {
        "format": FORMAT, "date": meta.get("date"), "outdir": meta.get("outdir", str(outdir)),
        "commit": meta.get("commit"), "dirty": meta.get("dirty"),
        **versions,
        "python": env.get("python"), "capability": env.get("capability"),
        "driver": env.get("driver"), "nvcc": env.get("nvcc"),
        "extension": {"built": build, "loads": ext.get("loads"), "has_cuda": ext.get("has_cuda"),
                      "path": ext.get("path"), "error": ext.get("error")},
        "stages": [{k: r.get(k) for k in ("name", "status", "rc", "duration_s", "timeout_s",
                                           "limit_s", "reason", "log")} for r in stages_view],
        "stage_durations_s": {r["name"]: r.get("duration_s") for r in records},
        "rehearsal": bool(env.get("rehearsal")),
        "tests": tests,
        "benchmarks": benches,
        "verdict": {
            "ok": bool(records) and not bad_stages and tot["failed"] == 0 and tot["errors"] == 0,
            "failed_stages": bad_stages,
            "tests": tot,
            "targets_met": met, "targets_not_met": not_met,
            "targets_not_measured": len(targets) - met - not_met,
        },
    }


def _rehearsal_cannot(log: Path) -> Optional[str]:
    """In a rehearsal, why a failed stage says nothing about the GPU machine
    (it reached the real GPU, or needs the CUDA toolchain that machine has),
    else None."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    if str(REHEARSE_DIR) not in sys.path:
        sys.path.insert(0, str(REHEARSE_DIR))
    import real_cuda
    line = real_cuda.needs_real_gpu(text)
    if line:
        return f"needs the real GPU: {line}"
    line = real_cuda.first_line(real_cuda.NO_CUDA_BUILD, text)
    return f"needs the CUDA toolchain or build: {line}" if line else None


def write_summary(outdir: Path, summary: dict) -> None:
    outdir = Path(outdir)
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
    (outdir / "summary.txt").write_text(format_summary(summary) + "\n")


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_summary(s: dict, max_failures: int = 25) -> str:
    """The summary as text (short enough to fit in a device run's output tail)."""
    cap = s.get("capability")
    ext = s["extension"]
    lines = [
        "=" * 78,
        f"gpu-check  {s.get('device_name') or '?'}"
        + (f" (sm_{cap[0]}{cap[1]})" if cap else "")
        + f"  torch {s.get('torch')}  CUDA {s.get('cuda')}  triton {s.get('triton')}"
        + f"  python {s.get('python')}",
        f"date {s.get('date')}  commit {(s.get('commit') or '?')[:12]}"
        + (" (dirty)" if s.get("dirty") else "") + f"  driver {s.get('driver')}",
        f"out  {s.get('outdir')}",
        "extension: " + ({"cuda": "CUDA build", "cpu": "C++ only (the CUDA build failed)"}.get(
            ext.get("built"), "not built")
            + (", imports" + (" with CUDA" if ext.get("has_cuda") else " without CUDA")
               if ext.get("loads") else f", does not import: {ext.get('error')}"
               if ext.get("loads") is False else "")),
        "",
        f"{'stage':15s} {'status':8s} {'rc':>4s} {'time':>7s} {'limit':>6s} {'used':>5s}",
    ]
    for r in s["stages"]:
        limit = r.get("limit_s") or r.get("timeout_s")
        used = (f"{100 * r['duration_s'] / limit:4.0f}%" if limit and r.get("duration_s")
                and r["status"] != "skipped" else "")
        lines.append(f"{r['name']:15s} {r['status']:8s} {_num(r.get('rc')):>4s} "
                     f"{(r.get('duration_s') or 0):6.1f}s {_num(limit):>5s}s {used:>5s}"
                     + (f"  {r['reason']}" if r.get("reason") else ""))
    t = s["tests"]
    lines += ["", f"{'tests':44s} {'passed':>6s} {'failed':>6s} {'skipped':>7s} {'errors':>6s}"]
    for f, c in t["files"].items():
        if c["passed"] is None:
            lines.append(f"{f:44s} {'no results':>28s}  ({c['stage']})")
        else:
            lines.append(f"{f:44s} {c['passed']:6d} {c['failed']:6d} {c['skipped']:7d} {c['errors']:6d}"
                         + ("  (from the log)" if c.get("source") == "log" else ""))
    tot = t["totals"]
    lines.append(f"{'total':44s} {tot['passed']:6d} {tot['failed']:6d} {tot['skipped']:7d} {tot['errors']:6d}")
    for inc in t["incomplete"]:
        lines.append(f"  incomplete: {inc['stage']}: {inc['why']}"
                     + (f"; still running: {', '.join(inc['running'][:3])}" if inc.get("running") else ""))
    for x in t["failures"][:max_failures]:
        lines.append(f"  {x['outcome'].upper():6s} {x['test']}: {x['message']}")
    if len(t["failures"]) > max_failures:
        lines.append(f"  ... and {len(t['failures']) - max_failures} more (summary.json)")
    reasons = t.get("skip_reasons") or {}
    if reasons:
        lines.append("skipped, by reason:")
        for why, n in list(reasons.items())[:12]:
            lines.append(f"  {n:4d}  {why[:110]}")
        if len(reasons) > 12:
            lines.append(f"  ... and {len(reasons) - 12} more reasons (summary.json)")
    if s.get("rehearsal"):
        gpu = sum(n for why, n in reasons.items() if why.startswith(NEEDS_REAL_GPU))
        lines += ["", "REHEARSAL on CPU: CUDA stood in for (one device), Triton kernels interpreted;"
                  " times are this machine's, the GPU tests skipped.",
                  f"  environment failures: {tot['failed'] + tot['errors']} (what fails here fails on"
                  f" the GPU machine too); tests that need the real GPU: {gpu} (skipped here)"]
    lines += ["", f"{'benchmark target':58s} {'value':>7s} {'goal':>8s}  met"]
    for b, e in s["benchmarks"].items():
        if e.get("error"):
            lines.append(f"{b}: {e['error']}")
        for n, tg in e["targets"].items():
            goal = f"{tg.get('cmp') or ''} {_num(tg.get('goal'))}".strip()
            met = {True: "yes", False: "NO", None: "n/a"}[tg.get("met")]
            lines.append(f"{(b + ' ' + n)[:58]:58s} {_num(tg.get('value')):>7s} {goal:>8s}  {met}"
                         + (f"  {tg['note'][:90]}" if tg.get("met") is None and tg.get("note") else ""))
    v = s["verdict"]
    lines += ["", "verdict: " + ("OK" if v["ok"] else "NOT OK")
              + (f"; stages failed: {', '.join(v['failed_stages'])}" if v["failed_stages"] else "")
              + f"; tests {tot['passed']} passed, {tot['failed']} failed, {tot['errors']} errors,"
              f" {tot['skipped']} skipped"
              + f"; targets {v['targets_met']} met, {v['targets_not_met']} not met,"
              f" {v['targets_not_measured']} not measured"
              + (f"; {s['total_s']:.0f} s" if s.get("total_s") is not None else ""),
              "=" * 78]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The env and ext stages (own processes: they import torch)

def _first_line(argv: List[str]) -> Optional[str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def cmd_env(path: str) -> int:
    import importlib.util
    import platform
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "pytest_plugins": [m for m in ("xdist", "pytest_timeout", "pytest_benchmark")
                               if importlib.util.find_spec(m) is not None]}
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if rehearsing():    # CUDA stood in for: the GPU machine's H100, nothing measured
        info.update(device_name="rehearsal (CPU standing in for one GPU)", capability=[9, 0],
                    device_count=torch.cuda.device_count(), rehearsal=True)
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=[props.major, props.minor],
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count,
                    device_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
    info["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    from torch.utils.cpp_extension import CUDA_HOME
    info["cuda_home"] = CUDA_HOME
    if CUDA_HOME:
        try:
            p = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                               capture_output=True, text=True, timeout=10)
            m = re.search(r"release ([\d.]+)", p.stdout)
            info["nvcc"] = m.group(1) if m else None
        except (OSError, subprocess.TimeoutExpired):
            info["nvcc"] = None
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0 if info["cuda_available"] else 1


def cmd_ext(path: str) -> int:
    import torch  # noqa: F401  (libc10 before the extension)
    info = {"loads": False, "has_cuda": None, "path": None, "error": None}
    try:
        import sampa_fused._C as C
        info.update(loads=True, path=os.path.relpath(C.__file__, REPO), has_cuda=bool(C.has_cuda()))
    except Exception as e:     # ImportError, or a symbol the build lacks
        info["error"] = f"{type(e).__name__}: {e}"
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0 if info["loads"] else 1


def cmd_stages(outdir_arg: Optional[str]) -> int:
    out = Path(outdir_arg or default_outdir("<device>"))
    stages = stage_list(out)
    for st in stages:
        cond = (f"  [only if {st.only_if_not_ok} failed]" if st.only_if_not_ok else
                f"  [skipped without {st.needs_file}]" if st.needs_file else "")
        env = " ".join(f"{k}={v}" for k, v in st.env.items())
        print(f"{st.name:14s} {st.timeout_s:4d} s  {st.purpose}{cond}\n"
              f"{'':21s}{env + ' ' if env else ''}{shlex.join(st.argv)}")
    print(f"sum of limits {sum(s.timeout_s for s in stages if not s.only_if_not_ok)} s "
          f"(+{GRACE_S} s grace each; a fallback uses what is left), budget {BUDGET_S} s")
    return 0


def rehearsal_environ(environ=None) -> Dict[str, str]:
    """The environment of a rehearsal: CUDA stood in for in every Python
    process (scripts/rehearse/sitecustomize.py, first on PYTHONPATH), Triton
    kernels interpreted, the CUDA toolkit where this machine has one."""
    env = dict(os.environ if environ is None else environ)
    env[REHEARSE_ENV] = "1"
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REHEARSE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not env.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"       # (a wrapper on PATH can mislead torch's guess)
    return env


def cmd_rehearse(outdir_arg: str) -> int:
    """The whole check, on this machine, with CUDA stood in for."""
    os.environ.update(rehearsal_environ())
    return cmd_run(outdir_arg)


def _run_quiet(argv: List[str], env: Dict[str, str], timeout: int = 120):
    try:
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, 124, e.stdout or "", f"timed out after {timeout} s")


def refusal_checks(env: Dict[str, str], python: str = sys.executable) -> List[dict]:
    """What must be refused in one line (or run) when CUDA is present, as the
    rehearsal's stand-in makes it."""
    checks = []

    def one(name, argv, want_rc, want, one_line=False):
        """want_rc 0: runs; else refused, the last line saying all of `want`
        (one_line: and nothing else printed), no traceback."""
        p = _run_quiet(argv, env)
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        ok = p.returncode == 0 if want_rc == 0 else (
            p.returncode != 0 and all(w in last for w in want) and "Traceback" not in p.stderr
            and (len(lines) == 1 or not one_line))
        checks.append({"check": name, "ok": ok, "rc": p.returncode,
                       "said": (lines[-1] if lines else "")[:200]})
    one("CUDA is present (the stand-in)", [python, "-c", "import torch; assert torch.cuda.is_available()"
        " and torch.cuda.device_count() == 1"], 0, [])
    one("sampa-train @Np with --device auto: one-line refusal naming --device cpu",
        [python, "-m", "sampa_fused.train", "compare", "--methods", "sam@2p", "--epochs", "1",
         "--no-progress"], 1, ["sampa-train: SAM@2p:", "--device cpu"], one_line=True)
    p = _run_quiet(["bash", "scripts/main-job.sh"], dict(env, MAIN_JOB_DRY_RUN="1", PYTHON=python))
    checks.append({"check": "main-job.sh: SAM and SAMPa on the GPU, streams engine",
                   "ok": p.returncode == 0 and "--device cuda --engine streams" in p.stdout
                   and "--methods sgd,sam,sampa-0,sampa-0.2" in p.stdout.replace("\\", ""),
                   "rc": p.returncode, "said": (p.stdout + p.stderr).strip()[-200:]})
    one("bench_comm.py 2 local ranks on one GPU: refused, naming --device cpu",
        [python, "bench/bench_comm.py", "--nproc", "2", "--ops", "all_reduce"], 2,
        ["NCCL needs one GPU per rank", "--device cpu"])
    return checks


def cmd_plan(outdir_arg: str) -> int:
    """The rehearsal's short form, for CI: the stage plan, which test files run
    where (and which are left to CI, and why), every planned file collected
    under the stand-in CUDA, and the refusals. Runs no test."""
    out = Path(outdir_arg).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = rehearsal_environ()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    os.environ[REHEARSE_ENV] = "1"                 # the planned pytest argv load the plugin
    stages = stage_list(out)
    plan = {"stages": [{"name": st.name, "timeout_s": st.timeout_s, "kind": st.kind,
                        "files": st.files, "cmd": shlex.join(st.argv),
                        "env": st.env} for st in stages],
            "ci_only": ci_only_test_files(REPO), "budget_s": BUDGET_S,
            "sum_of_limits_s": sum(st.timeout_s + GRACE_S for st in stages if not st.only_if_not_ok)}
    planned = [f for st in stages for f in st.files]
    p = _run_quiet([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                    "-p", "rehearsal_plugin", *planned], env, timeout=300)
    collected: Dict[str, int] = {}
    for line in p.stdout.splitlines():
        m = re.match(r"^(\S+\.py)::", line)
        if m:
            collected[m.group(1)] = collected.get(m.group(1), 0) + 1
    errors = sorted(set(re.findall(r"ERROR collecting (\S+\.py)", p.stdout + p.stderr)))
    plan["collected"] = {f: collected.get(f, 0) for f in planned}
    plan["collection_errors"] = errors
    plan["refusals"] = refusal_checks(env)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"gpu-check plan (rehearsal, short form): budget {BUDGET_S} s, limits + grace "
          f"{plan['sum_of_limits_s']} s (a fallback stage uses what is left)")
    for st in plan["stages"]:
        print(f"  {st['name']:14s} {st['timeout_s']:4d} s" + (
            "  " + ", ".join(f"{Path(f).name} ({plan['collected'][f]})" for f in st["files"])
            if st["files"] else ""))
    print(f"  left to CI: {len(plan['ci_only'])} files")
    for f, why in plan["ci_only"].items():
        print(f"    {f}: {why}")
    for c in plan["refusals"]:
        print(f"  {'ok ' if c['ok'] else 'NOT OK'} {c['check']}" + ("" if c["ok"] else f": rc {c['rc']}, {c['said']}"))
    bad = errors or [f for f in planned if not plan["collected"][f]] or \
        [c for c in plan["refusals"] if not c["ok"]]
    if errors:
        print("  collection errors: " + ", ".join(errors))
    print("plan: " + ("OK" if not bad else "NOT OK"))
    return 0 if not bad else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: gpu_check.py run [OUTDIR] | rehearse OUTDIR | plan OUTDIR | stages [OUTDIR] | "
             "summarize OUTDIR | env PATH | ext PATH")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run" and len(rest) <= 1:
        return cmd_run(rest[0] if rest else None)
    if cmd == "rehearse" and len(rest) == 1:
        return cmd_rehearse(rest[0])
    if cmd == "plan" and len(rest) == 1:
        return cmd_plan(rest[0])
    if cmd == "stages" and len(rest) <= 1:
        return cmd_stages(rest[0] if rest else None)
    if cmd == "summarize" and len(rest) == 1:
        s = summarize(Path(rest[0]))
        write_summary(Path(rest[0]), s)
        print(format_summary(s))
        return 0 if s["verdict"]["ok"] else 1
    if cmd == "env" and len(rest) == 1:
        return cmd_env(rest[0])
    if cmd == "ext" and len(rest) == 1:
        return cmd_ext(rest[0])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
