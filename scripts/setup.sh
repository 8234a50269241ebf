#!/usr/bin/env bash
# Set up a machine for sampa-fused: dependencies, then the package with its
# compiled extension. Installs only what is missing, so a machine that has
# everything (the GPU machine, which reaches no package registry) needs no pip.
# Uses an installed torch where there is one (GPU machines); pins the CPU build
# otherwise (an unpinned torch pulls CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

say() { echo "setup.sh: $*" >&2; }
if ! command -v "$PY" >/dev/null; then
    say "ERROR: no Python at '$PY' (set PYTHON to the interpreter to set up)"
    exit 1
fi
# pip's status, not an abort under set -e: what failed is reported below
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# The repeat call: a stamp of everything the checks below depend on (this
# python, its PYTHONPATH, the torch version, the installed distributions, the
# build sources and the built extension). Unchanged: nothing to do, in well
# under a second. Written only after a set-up that left nothing missing.
STAMP=build/setup.stamp
BUILT_FOR=build/_C.torch          # the torch version sampa_fused._C was built against
state_key() {
    "$PY" - "$PY" <<'EOF'
import glob, hashlib, os, sys
from importlib import metadata
h = hashlib.sha256()
def add(*parts):
    h.update(("\0".join(map(str, parts)) + "\n").encode())
try:
    torch_version = metadata.version("torch")
except metadata.PackageNotFoundError:
    torch_version = "none"
add(sys.argv[1], os.path.realpath(sys.executable), sys.version, os.environ.get("PYTHONPATH", ""))
add("torch", torch_version)
for d in sys.path:                # what is installed: the distributions' metadata folders
    if os.path.isdir(d):
        add(d, sorted(n for n in os.listdir(d) if n.endswith((".dist-info", ".egg-info", ".egg-link", ".pth"))))
files = ["setup.py", "pyproject.toml", "scripts/setup.sh", "build/_C.torch"] + sorted(glob.glob("csrc/**", recursive=True))
for f in files:
    if os.path.isfile(f):
        with open(f, "rb") as fh:
            add(f, hashlib.sha256(fh.read()).hexdigest())
for so in sorted(glob.glob("sampa_fused/_C*.so")):
    st = os.stat(so)
    add(so, st.st_size, st.st_mtime_ns)
print(h.hexdigest())
EOF
}
if [ "${SAMPA_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(state_key 2>/dev/null || true)" = "$(cat "$STAMP")" ]; then
    say "nothing changed since the last set-up ($STAMP): done"
    exit 0
fi

# module:package pairs. Essential: without them nothing builds or tests.
ESSENTIAL=(numpy:numpy pytest:pytest setuptools:setuptools)
OPTIONAL=(triton:triton==3.8.0 pytest_benchmark:pytest-benchmark tqdm:tqdm matplotlib:matplotlib
          sklearn:scikit-learn ninja:ninja wheel:wheel ruff:ruff safetensors:safetensors
          accelerate:accelerate lightning:lightning transformers:transformers)
purpose() {
    case $1 in
        numpy) echo "tensor conversions, the data sets and the benchmarks" ;;
        pytest) echo "running the tests" ;;
        setuptools) echo "building the extension (setup.py)" ;;
        triton) echo "backend='triton' (its tests skip without it)" ;;
        pytest_benchmark) echo "bench/test_*.py" ;;
        tqdm) echo "progress bars of sampa_fused.train" ;;
        matplotlib) echo "the plots of the benchmarks and of sampa_fused.train" ;;
        sklearn) echo "the digits data set (sampa_fused.train, scripts/main-job.sh, tests/test_train.py)" ;;
        ninja) echo "fast extension builds (torch falls back to a slow one)" ;;
        wheel) echo "building wheels" ;;
        ruff) echo "the lint step of scripts/test.sh" ;;
        safetensors|accelerate|lightning|transformers) echo "the tests of saving and training loops with $1 (they skip without it)" ;;
        *) echo "?" ;;
    esac
}
# The pairs whose module does not import, one python for all of them.
missing_of() {
    "$PY" - "$@" <<'EOF'
import importlib, sys
for pair in sys.argv[1:]:
    try:
        importlib.import_module(pair.split(":")[0])
    except Exception:
        print(pair)
EOF
}

TORCH=torch:torch==2.13.0
complete=1
mapfile -t missing < <(missing_of "$TORCH" "${ESSENTIAL[@]}" "${OPTIONAL[@]}")
if [ "${missing[0]:-}" = "$TORCH" ]; then
    if ! pip_install "${TORCH#*:}"; then
        say "ERROR: torch does not import with $PY and pip could not install ${TORCH#*:}" \
            "(is a package registry reachable?). Install torch for $PY, then run this again."
        exit 1
    fi
    missing=("${missing[@]:1}")
fi
if [ ${#missing[@]} -gt 0 ]; then
    if ! pip_install "${missing[@]#*:}"; then
        mapfile -t still < <(missing_of "${missing[@]}")
        fatal=0
        say "pip could not install what is missing (is a package registry reachable?):"
        for pair in "${still[@]}"; do
            mod=${pair%%:*}
            kind=optional
            for e in "${ESSENTIAL[@]}"; do
                if [ "$e" = "$pair" ]; then kind=NEEDED; fatal=1; fi
            done
            say "  $kind: $mod (pip package ${pair#*:}): $(purpose "$mod")"
        done
        if [ $fatal = 1 ]; then
            say "ERROR: install the NEEDED packages for $PY (or carry their wheels), then run this again."
            exit 1
        fi
        say "continuing without the optional ones"
        complete=0
    fi
fi

# The package from this checkout, with its extension (a CUDAExtension where
# torch has CUDA and nvcc is found, else C++ only).
here=$(pwd -P)/sampa_fused
# where `import sampa_fused` leads from outside the checkout (installed, or PYTHONPATH)
found=$(cd / && "$PY" -c "import os, sampa_fused; print(os.path.realpath(os.path.dirname(sampa_fused.__file__)))" 2>/dev/null || true)
# The checkout's own extension imports (from here the checkout's package comes
# first, but an editable install of another checkout can still supply _C).
ext_check='import os, sys, torch, sampa_fused._C as C
where = os.path.dirname(os.path.realpath(C.__file__))
sys.exit(0 if where == os.path.realpath("sampa_fused") else f"sampa_fused._C comes from {where}")'
ext_imports() { "$PY" -c "$ext_check" >/dev/null 2>&1; }
built=(sampa_fused/_C*.so)
[ -e "${built[0]}" ] || built=()
build_in_place() {
    say "building sampa_fused._C in place: $1"
    MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace
}

torch_now=$("$PY" -c 'from importlib import metadata; print(metadata.version("torch"))' 2>/dev/null || echo unknown)
built_for=$(cat "$BUILT_FOR" 2>/dev/null || true)
torch_changed=0
if [ ${#built[@]} -gt 0 ] && [ -n "$built_for" ] && [ "$built_for" != "$torch_now" ]; then
    torch_changed=1    # it may still import, and then fail at the first call into another torch's ABI
fi
if [ "${SAMPA_REBUILD:-0}" = 1 ] || [ $torch_changed = 1 ] || ! ext_imports; then
    if [ "${SAMPA_REBUILD:-0}" = 1 ]; then
        why="SAMPA_REBUILD=1"
    elif [ $torch_changed = 1 ]; then
        why="built against torch $built_for, torch is now $torch_now"
    elif [ ${#built[@]} -gt 0 ]; then
        why="${built[*]} does not import with $PY (built for another Python or torch)"
    else
        why="not built yet"
    fi
    if [ "$found" = "$here" ] || [ ${#built[@]} -gt 0 ]; then
        # Installed already, or a copied tree: in place needs no pip and no registry.
        build_in_place "$why"
    elif ! MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .; then
        # A fresh checkout: the editable install builds the extension too.
        say "pip could not install the package (editable); building in place instead"
        build_in_place "$why"
    fi
fi
if [ "${SAMPA_FUSED_BUILD:-auto}" != none ] && ! ext_imports; then
    say "ERROR: sampa_fused._C does not import with $PY after the build:"
    "$PY" -c "$ext_check" 2>&1 | tail -n 3 >&2 || true
    exit 1
fi
mkdir -p build
if ext_imports; then
    # built now, or found importing with no record: it belongs to this torch
    echo "$torch_now" > "$BUILT_FOR"
fi
if [ "$found" != "$here" ]; then           # the editable install may have changed it
    found=$(cd / && "$PY" -c "import os, sampa_fused; print(os.path.realpath(os.path.dirname(sampa_fused.__file__)))" 2>/dev/null || true)
fi
if [ "$found" != "$here" ]; then
    say "note: sampa_fused is not installed for $PY${found:+ (it finds $found)}; it imports from" \
        "$(pwd -P) when run from there (python -m pytest, scripts/*.sh) or with PYTHONPATH=$(pwd -P)"
fi
if [ "$complete" = 1 ]; then
    state_key > "$STAMP" 2>/dev/null || rm -f "$STAMP"
else
    rm -f "$STAMP"                            # retry the missing ones next time
fi
