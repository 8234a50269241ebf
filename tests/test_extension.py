"""The compiled extension sampa_fused._C and its build.

CI builds it first (`pip install --no-build-isolation -e .`) and sets
SAMPA_REQUIRE_EXT=1, so a broken build fails here instead of skipping. The
CUDA source is compiled with nvcc wherever nvcc exists (compile only), so
CUDA code that does not compile fails CI on machines without a GPU too.
"""
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sampa_fused import _ext, flat
from sampa_fused.flat import build_slabs

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("SAMPA_REQUIRE_EXT", "0") not in ("", "0")


@pytest.fixture(scope="module")
def C():
    try:
        import sampa_fused._C as mod
    except ImportError as e:
        if REQUIRE:
            pytest.fail(f"SAMPA_REQUIRE_EXT is set but sampa_fused._C does not import: {e}")
        pytest.skip(f"sampa_fused._C is not built ({e}); build it with "
                    "`pip install --no-build-isolation -e .`")
    return mod


def test_extension_loads(C):
    assert _ext.load_extension() is C
    assert isinstance(C.has_cuda(), bool)
    if torch.version.cuda is None:            # a CPU torch can only build the C++ part
        assert C.has_cuda() is False
    assert _ext.has_cuda_ops() == C.has_cuda()
    if not C.has_cuda():
        assert C.device_count() == 0


# ---------------------------------------------------------------- layout
# The flat-buffer layout runs once at set-up and is plain Python
# (sampa_fused.flat.plan_layout); it had a C++ twin in the extension, whose
# tests lived here.
@pytest.mark.parametrize("numels,keys,aligns,expected", [
    ([], [], [], ([], [], [])),
    # one slab: each offset rounded up to the alignment after the previous end
    ([5, 3, 2], [0, 0, 0], [4, 4, 4], ([0, 0, 0], [0, 8, 12], [14])),
    # slabs numbered by first appearance of their key, whatever the key's value
    ([1, 2, 3, 4], [7, -3, 7, 2 ** 40], [1, 1, 2, 8], ([0, 1, 0, 2], [0, 0, 2, 0], [5, 2, 4])),
    # empty tensors take no room but are aligned too, so a trailing one pads
    ([0, 3, 0], [1, 1, 1], [4, 4, 4], ([0, 0, 0], [0, 0, 4], [4])),
    # alignments need not be powers of two; sizes beyond 32 bits
    ([2 ** 33, 1, 7], [0, 0, 0], [1, 1000, 3], ([0, 0, 0], [0, 2 ** 33 + 408, 2 ** 33 + 409],
                                                [2 ** 33 + 416])),
])
def test_plan_layout_examples(numels, keys, aligns, expected):
    assert tuple(flat.plan_layout(numels, keys, aligns)) == expected


@pytest.mark.parametrize("seed", range(6))
def test_plan_layout_properties(seed):
    rng = random.Random(seed)
    for n in (1, 2, 17, 300):
        keys = [rng.choice([0, 1, 2, 7, -3, 2 ** 40]) for _ in range(n)]
        numels = [rng.choice([0, 1, 3, rng.randrange(1, 5000), rng.randrange(1, 2 ** 33)])
                  for _ in range(n)]
        aligns = [rng.choice([1, 2, 4, 8, 16, 3, 1000]) for _ in range(n)]
        ids, offs, sizes = flat.plan_layout(numels, keys, aligns)
        assert len(ids) == len(offs) == n
        first_seen = list(dict.fromkeys(keys))                 # keys by first appearance
        assert ids == [first_seen.index(k) for k in keys]
        ends = {}
        for s, o, m, a in zip(ids, offs, numels, aligns):
            prev = ends.get(s, 0)
            # aligned, after the previous tensor of its slab, and no gap beyond the alignment
            assert o % a == 0 and prev <= o < prev + a, (s, o, m, a, prev)
            ends[s] = o + m
        assert sizes == [ends[s] for s in range(len(first_seen))]


@pytest.mark.parametrize("numels,aligns", [([4, -1], [1, 1]), ([4, 2], [1, 0]), ([3], [-8])])
def test_plan_layout_rejects_bad_entries(numels, aligns):
    with pytest.raises(ValueError, match=r"bad layout entry: numel=-?\d+, align=-?\d+"):
        flat.plan_layout(numels, [0] * len(numels), aligns)


def test_plan_layout_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"differ in length \(2, 1, 2\)"):
        flat.plan_layout([1, 2], [0], [1, 1])


def test_build_slabs_needs_no_extension(monkeypatch):
    """Laying out the flat buffers must work in a pure-Python install."""
    def refuse(*a, **k):
        raise AssertionError("build_slabs asked for the compiled extension")
    monkeypatch.setattr(_ext, "load_extension", refuse)
    ts = [torch.empty(n, dtype=dt) for n, dt in ((5, torch.float32), (3, torch.float16),
                                                 (7, torch.float32))]
    f32, f16 = build_slabs(ts, [0, 1, 0])
    assert (f32.dtype, f32.index, f32.offsets) == (torch.float32, [0, 2], [0, 16])
    assert (f16.dtype, f16.index, f16.offsets) == (torch.float16, [1], [0])


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(_ext, "_ext", None)
    monkeypatch.setattr(_ext, "_error", ImportError("simulated: not built"))
    assert _ext.load_extension(required=False) is None
    assert _ext.has_cuda_ops() is False
    with pytest.raises(RuntimeError, match="the peer engine needs the compiled extension.*"
                                           "no-build-isolation"):
        _ext.load_extension(feature="the peer engine")


def test_cpu_build_refuses_cuda_features_clearly(C):
    if C.has_cuda():
        pytest.skip("built with the CUDA part")
    t = torch.zeros(4)
    for call in (lambda: C.PeerLink(0, 1, -1, -1, False, 1 << 20),
                 lambda: C.can_access_peer(0, 1),
                 lambda: C.enable_peer_access(0, 1)):
        with pytest.raises(RuntimeError, match="built without its CUDA part.*no-build-isolation"):
            call()
    with pytest.raises(ValueError, match="CUDA tensor"):       # checked before the stream
        C.memcpy_async(t, t)


# ---------------------------------------------------------------- the CUDA source
def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _symbols(path):
    """Global functions of namespace sampa_cuda defined in an object or library."""
    out = subprocess.run(["nm", "-C", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ T (sampa_cuda::[^\[]*?)\s*$", line)
        if m and "(anonymous namespace)" not in m.group(1) and "LinkImpl::" not in m.group(1):
            found.add(m.group(1))
    return found


@pytest.fixture(scope="module")
def cuda_object(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA source cannot be compile-checked")
    obj = tmp_path_factory.mktemp("nvcc") / "sampa_fused_cuda.o"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [nvcc, "-std=c++17", "-O2", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-I", str(ROOT / "csrc"), "-c", str(ROOT / "csrc" / "sampa_fused_cuda.cu"),
           "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed on csrc/sampa_fused_cuda.cu:\n{res.stderr[-4000:]}"
    return obj


def test_cuda_source_compiles(cuda_object):
    assert cuda_object.stat().st_size > 0


def test_cuda_source_and_bindings_define_the_same_api(C, cuda_object):
    """Both csrc files define the API of csrc/sampa_fused.h with qualified
    names, so a definition that differs from the header does not compile. What
    the compiler cannot see is a function defined by one file and not the other
    (a CUDA build would then fail to link or to import): compare the functions
    of namespace sampa_cuda that the built extension defines (the CPU build's
    refusals, or the .cu's own in a CUDA build) with those of the .cu."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not found")
    ext_api, cu_api = _symbols(C.__file__), _symbols(cuda_object)
    assert len(cu_api) >= 10, cu_api
    assert ext_api == cu_api, (
        f"only in the extension (csrc/sampa_fused.cpp): {sorted(ext_api - cu_api)}; "
        f"only in csrc/sampa_fused_cuda.cu: {sorted(cu_api - ext_api)}")


def test_csrc_files_share_the_header():
    """The API is declared once, in csrc/sampa_fused.h, which must stay free of
    torch and CUDA headers (the CPU build and the ordering test include it)."""
    header = (ROOT / "csrc" / "sampa_fused.h").read_text()
    includes = re.findall(r"^\s*#\s*include\s*[<\"]([^>\"]+)", header, re.M)
    assert includes and not [i for i in includes if "torch" in i or "cuda" in i or "c10" in i], \
        includes
    for name in ("sampa_fused.cpp", "sampa_fused_cuda.cu"):
        src = (ROOT / "csrc" / name).read_text()
        assert re.search(r'^#include "sampa_fused.h"', src, re.M), f"{name} does not include it"


# ---------------------------------------------------------------- setup.py
def _setup(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env=full_env, timeout=300)


def test_setup_metadata():
    res = _setup("--name", "--version")
    assert res.returncode == 0, res.stderr
    name, version = res.stdout.split()[-2:]
    import sampa_fused
    assert name == "sampa-fused" and version == sampa_fused.__version__


@pytest.mark.parametrize("env,match", [
    ({"SAMPA_FUSED_BUILD": "fast"}, "SAMPA_FUSED_BUILD must be one of"),
])
def test_setup_refuses_bad_mode(env, match):
    res = _setup("--name", env=env)
    assert res.returncode != 0 and re.search(match, res.stderr)


def test_setup_cuda_mode_says_what_is_missing():
    if torch.version.cuda is not None and _nvcc() is not None:
        pytest.skip("this machine can build the CUDA extension")
    res = _setup("--name", env={"SAMPA_FUSED_BUILD": "cuda"})
    assert res.returncode != 0 and "SAMPA_FUSED_BUILD=cuda needs" in res.stderr


def test_setup_without_torch_says_how_to_build(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: torch hidden by build isolation')")
    res = _setup("--name", env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode != 0 and "--no-build-isolation" in res.stderr
    ok = _setup("--name", env={"PYTHONPATH": str(tmp_path), "SAMPA_FUSED_BUILD": "none"})
    assert ok.returncode == 0 and "sampa-fused" in ok.stdout
