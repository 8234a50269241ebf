"""Build and install sampa-fused.

    pip install --no-build-isolation -e .      # from the repository root

builds the compiled extension `sampa_fused._C` with torch's BuildExtension and
ninja against the torch that is already installed. `--no-build-isolation` is
needed: pip's isolated build environment cannot see that torch.

SAMPA_FUSED_BUILD chooses what is built:
    auto (default)  the CUDA extension when torch has CUDA and nvcc is found
                    (CUDA_HOME), the C++ (CPU) extension otherwise
    cuda            the CUDA extension, or an error saying what is missing
    cpu             the C++ extension only (no peer engine copies)
    none            no extension: a pure-Python install (the package works;
                    features that need the extension say so)
MAX_JOBS limits parallel compile jobs; TORCH_CUDA_ARCH_LIST the GPU targets.
"""
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("auto", "cuda", "cpu", "none")


def read_version() -> str:
    with open(os.path.join(HERE, "sampa_fused", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not match:
        raise RuntimeError("setup.py: no __version__ in sampa_fused/__init__.py")
    return match.group(1)


def extension_setup(mode: str) -> dict:
    """ext_modules and cmdclass for the chosen build mode."""
    if mode == "none":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        sys.exit(
            "setup.py: torch is not importable here, and sampa_fused._C is built against the "
            f"installed torch ({e}).\nIf torch is installed, pip's build isolation is hiding "
            "it: run `pip install --no-build-isolation -e .`\nOtherwise install torch first, "
            "or set SAMPA_FUSED_BUILD=none for a pure-Python install without the extension.")
    nvcc = None
    if cpp_extension.CUDA_HOME:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    torch_cuda = torch.version.cuda is not None
    if mode == "cuda" and not (torch_cuda and nvcc):
        missing = []
        if not torch_cuda:
            missing.append(f"a CUDA build of torch (this one is {torch.__version__})")
        if not nvcc:
            missing.append(f"nvcc (CUDA_HOME={cpp_extension.CUDA_HOME!r}; set CUDA_HOME to the "
                           "CUDA toolkit)")
        sys.exit("setup.py: SAMPA_FUSED_BUILD=cuda needs " + " and ".join(missing) +
                 ". Use SAMPA_FUSED_BUILD=cpu for the C++ part only.")
    use_cuda = mode == "cuda" or (mode == "auto" and torch_cuda and nvcc is not None)

    sources = ["csrc/sampa_fused.cpp"]
    # The shared API header: a change rebuilds both files, and sdists carry it.
    depends = ["csrc/sampa_fused.h"]
    cxx = ["-O2"]
    if use_cuda:
        sources.append("csrc/sampa_fused_cuda.cu")
        ext = cpp_extension.CUDAExtension(
            "sampa_fused._C", sources, depends=depends,
            define_macros=[("SAMPA_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O2"]})
    else:
        ext = cpp_extension.CppExtension("sampa_fused._C", sources, depends=depends,
                                         extra_compile_args={"cxx": cxx})
    print(f"setup.py: building sampa_fused._C as a {'CUDA' if use_cuda else 'C++ (CPU)'} "
          f"extension against torch {torch.__version__}", file=sys.stderr)
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


mode = os.environ.get("SAMPA_FUSED_BUILD", "auto").strip().lower() or "auto"
if mode not in MODES:
    sys.exit(f"setup.py: SAMPA_FUSED_BUILD must be one of {MODES}, got {mode!r}")

setup(
    name="sampa-fused",
    version=read_version(),
    description="SAMPa and SAM as drop-in PyTorch optimizers over flat parameter buffers, "
                "with Triton kernels, a C++/CUDA extension and several engines",
    packages=find_packages(include=["sampa_fused", "sampa_fused.*"]),
    python_requires=">=3.10",
    # torch is what the library needs (an installed torch that satisfies this
    # is kept as it is); Triton comes with torch's CUDA builds, and without it
    # the torch backend runs. The CLI and the benchmarks need more: extras.
    install_requires=["torch>=2.3"],
    extras_require={"train": ["numpy", "tqdm", "matplotlib", "scikit-learn"],
                    "bench": ["numpy", "matplotlib", "pytest-benchmark", "tqdm"],
                    "test": ["pytest", "pytest-benchmark"],
                    # sampa_fused.integrations.huggingface (SAMPaTrainer)
                    "huggingface": ["transformers"]},
    entry_points={"console_scripts": ["sampa-train = sampa_fused.train:main"]},
    zip_safe=False,
    **extension_setup(mode),
)
