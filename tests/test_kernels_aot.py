"""Every Triton kernel variant the library launches, compiled ahead of time for
the GPU machine's H100 (sm_90) without a GPU, and ptxas's report read.

The variants are the launches themselves: SAMPa and SAM steps with each base
optimizer that has kernels (SGD, AdamW) on fp32, bf16 and fp16 parameters run
in Triton's interpreter with the CUDA launch shapes, and every launch through
the CUDA runtime seam (sampa_fused._cuda.launch) is recorded with its
argument types, 16-byte alignment and constexprs. Each distinct variant is
then compiled by triton.compiler.ASTSource for GPUTarget("cuda", 90, 32) and
its PTX assembled by the ptxas that triton bundles (`ptxas -v`):

- it compiles;
- no register spills (spill stores and loads both 0);
- no fp64 instruction (the kernels compute in fp32);
- the elementwise kernels (all but the check reduction) use 16-byte vector
  loads (ld.global.v4) on the 16-byte-aligned flat buffers.

Both steps run in subprocesses (the interpreter must be on for the first
and off for the second). Triton caches what it compiled, and ptxas reports
are cached by the PTX's hash, so a second run takes seconds. Skipped only
where triton (or its bundled ptxas) is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def bundled_ptxas():
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    p = Path(nv.__file__).parent / "bin" / "ptxas"
    return p if p.exists() and os.access(p, os.X_OK) else None


RECORD = textwrap.dedent('''
    import inspect, json, sys
    import torch, torch.nn as nn, torch.nn.functional as F
    import sampa_fused.update as U
    from sampa_fused import SAM, SAMPa, _cuda
    from sampa_fused.update.common import CUDA_CONFIG

    assert U.common.kernels_interpreted(), "TRITON_INTERPRET=1 was not in effect"
    U.default_config = lambda device: CUDA_CONFIG     # the GPU's launch shapes, interpreted
    TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64",
             torch.uint8: "u8", torch.int8: "i8"}
    variants, scenario = {}, [None]
    real = _cuda.launch

    def record(kernel, grid, args, meta, *rest):
        fn = getattr(kernel, "fn", kernel)
        names = list(inspect.signature(fn).parameters)
        consts = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        sig, aligned = {}, []
        for name, a in zip([n for n in names if n not in consts], args):
            if isinstance(a, torch.Tensor):
                sig[name] = "*" + TYPES[a.dtype]
                ok = a.data_ptr() % 16 == 0
            elif isinstance(a, bool):
                sig[name], ok = "i1", False
            elif isinstance(a, int):
                sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
                ok = a % 16 == 0
            else:
                sig[name], ok = "fp32", False
            if ok:
                aligned.append(name)
        v = dict(module=fn.__module__, kernel=fn.__name__, signature=sig, constexprs=consts,
                 num_warps=meta.get("num_warps", 4), aligned=sorted(aligned))
        key = json.dumps(v, sort_keys=True)
        variants.setdefault(key, dict(v, scenarios=[]))["scenarios"].append(scenario[0])
        return real(kernel, grid, args, meta, *rest)
    _cuda.launch = record

    class Net(nn.Module):          # odd sizes: the flat buffers pad them to alignment
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(23, 61), nn.Linear(61, 7)
        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 23, generator=g), torch.randint(0, 7, (16,), generator=g))
               for _ in range(2)]
    bases = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
             "adamw": (torch.optim.AdamW, dict(lr=1e-3))}
    methods = {"sampa": (SAMPa, dict(lam=0.2)), "sam": (SAM, {})}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bname, (base, bkw) in bases.items():
            for mname, (method, mkw) in methods.items():
                scenario[0] = f"{mname}/{bname}/{TYPES[dtype]}"
                torch.manual_seed(0)
                model = Net().to(dtype)
                opt = method(model, loss_fn, base, backend="triton", **bkw, **mkw)
                for b in batches:
                    opt.step(b)
    json.dump(list(variants.values()), open(sys.argv[1], "w"), indent=1)
''')

COMPILE = textwrap.dedent('''
    import hashlib, importlib, json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variants = json.load(open(sys.argv[1]))
    ptxas, cache = sys.argv[3], sys.argv[4]
    os.makedirs(cache, exist_ok=True)
    target = GPUTarget("cuda", 90, 32)
    out = []
    for v in variants:
        r = {k: v[k] for k in ("module", "kernel", "signature", "constexprs", "num_warps", "aligned",
                               "scenarios")}
        try:
            fn = getattr(importlib.import_module(v["module"]), v["kernel"])
            names = fn.arg_names
            sig = {a: "constexpr" if a in v["constexprs"] else v["signature"][a] for a in names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in v["aligned"]}
            k = triton.compile(ASTSource(fn, sig, constexprs=v["constexprs"], attrs=attrs),
                               target=target, options=dict(num_warps=v["num_warps"]))
            ptx = k.asm["ptx"]
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:600]
            out.append(r)
            continue
        digest = hashlib.sha256(ptx.encode()).hexdigest()
        report = os.path.join(cache, digest + ".ptxas.txt")
        if not os.path.exists(report):
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "k.ptx")
                open(src, "w").write(ptx)
                arch = re.search(r"^\\s*\\.target\\s+(sm_\\w+)", ptx, re.M).group(1)   # sm_90a
                p = subprocess.run([ptxas, "-v", "--gpu-name", arch, src, "-o",
                                    os.path.join(d, "k.cubin")], capture_output=True, text=True)
            if p.returncode != 0:
                r["error"] = "ptxas: " + (p.stderr or p.stdout)[-600:]
                out.append(r)
                continue
            open(report + ".tmp", "w").write(p.stderr + p.stdout)
            os.replace(report + ".tmp", report)
        text = open(report).read()
        spills = [(int(a), int(b)) for a, b in
                  re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", text)]
        body = "\\n".join(ln.split("//")[0] for ln in ptx.splitlines())
        r.update(ptxas=" ".join(text.split())[:400], spill_stores=sum(a for a, _ in spills),
                 spill_loads=sum(b for _, b in spills), reported=bool(spills),
                 fp64=sorted(set(re.findall(r"\\b[a-z]+(?:\\.[a-z0-9]+)*\\.f64\\b", body)))[:8],
                 v4_loads=len(re.findall(r"ld\\.global(?:\\.[a-z0-9]+)*\\.v4", body)),
                 loads=len(re.findall(r"\\bld\\.global", body)))
        out.append(r)
    json.dump(out, open(sys.argv[2], "w"), indent=1)
''')


def _env(interpret: bool):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.pop("SAMPA_GPU_CHECK_REHEARSE", None)          # real torch.cuda answers here
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sampa-fused" / "aot-ptxas"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    ptxas = bundled_ptxas()
    if ptxas is None:
        pytest.skip("triton's bundled ptxas (triton/backends/nvidia/bin/ptxas) is not here")
    tmp = tmp_path_factory.mktemp("aot")
    rec, res = tmp / "variants.json", tmp / "compiled.json"
    p = subprocess.run([sys.executable, "-c", RECORD, str(rec)], capture_output=True, text=True,
                       env=_env(True), timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-c", COMPILE, str(rec), str(res), str(ptxas),
                        str(_cache_dir())], capture_output=True, text=True, env=_env(False),
                       timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(res.read_text())


def _name(r):
    consts = ",".join(f"{k}={v}" for k, v in sorted(r["constexprs"].items()) if k not in ("BLOCK", "ITERS"))
    ptrs = sorted({t for t in r["signature"].values() if t.startswith("*")})
    return f"{r['kernel']}[{consts}; {'/'.join(ptrs)}; {r['num_warps']} warps] ({r['scenarios'][0]})"


def _elementwise(r) -> bool:
    return "check" not in r["kernel"]


def test_every_scenario_launched_its_kernels(compiled):
    scenarios = {s for r in compiled for s in r["scenarios"]}
    want = {f"{m}/{b}/{d}" for m in ("sampa", "sam") for b in ("sgd", "adamw")
            for d in ("fp32", "bf16", "fp16")}
    assert scenarios == want
    for s in want:
        dt = s.rsplit("/", 1)[1]
        mine = [r for r in compiled if s in r["scenarios"]]
        # the parameter buffers' dtype reaches an elementwise kernel, and the check runs
        assert any(_elementwise(r) and f"*{dt}" in r["signature"].values() for r in mine), s
        assert any(not _elementwise(r) for r in mine), s
    # one variant per distinct (kernel, types, alignment, constexprs): a few dozen
    assert 12 <= len(compiled) <= 400


def test_every_variant_compiles_for_sm90(compiled):
    bad = [f"{_name(r)}: {r['error']}" for r in compiled if "error" in r]
    assert not bad, "\n".join(bad)


def test_no_register_spills(compiled):
    ok = [r for r in compiled if "error" not in r]
    assert all(r["reported"] for r in ok), "ptxas -v printed no spill line: its output changed"
    bad = [f"{_name(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
           for r in ok if r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(bad)


def test_no_fp64_instructions(compiled):
    bad = [f"{_name(r)}: {', '.join(r['fp64'])}" for r in compiled
           if "error" not in r and r["fp64"] and "*fp64" not in r["signature"].values()]
    assert not bad, "\n".join(bad)


def test_elementwise_kernels_use_16_byte_loads(compiled):
    checked = [r for r in compiled if "error" not in r and _elementwise(r)]
    assert checked
    for r in checked:       # the flat buffers and their lengths are 16-byte aligned
        assert "n" not in r["signature"] or "n" in r["aligned"], _name(r)
    bad = [f"{_name(r)}: {r['v4_loads']} of {r['loads']} global loads are ld.global.v4"
           for r in checked if r["v4_loads"] == 0]
    assert not bad, "\n".join(bad)
