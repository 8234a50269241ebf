"""What says "the real GPU was reached" in a rehearsal (standard library only:
scripts/gpu_check.py reads stage logs with it, rehearsal_plugin.py test
reports)."""
import re

NO_GPU = "rehearsal: no real GPU behind the stand-in CUDA"    # sitecustomize.py raises it
# What torch, triton, the extension and the scripts say when CUDA is used for real.
REAL_CUDA = re.compile("|".join(map(re.escape, [
    NO_GPU,
    "Found no NVIDIA driver",
    "Torch not compiled with CUDA enabled",
    "requires CUDA support",
    "No CUDA GPUs are available",
    "no CUDA-capable device",
    "CUDA driver initialization failed",
    "Tried to instantiate dummy base class",
    "has no attribute '_cuda_",
    "libcuda.so",
    "0 active drivers",
])))
# What cannot be built or run here for want of a CUDA toolchain that the GPU
# machine has (a stage that stops on it is not the GPU machine's failure).
NO_CUDA_BUILD = re.compile("|".join(map(re.escape, [
    "SAMPA_FUSED_BUILD=cuda needs",
    "needs the CUDA part of the extension",
])))


def first_line(pattern, text: str):
    """The first line of text that matches pattern, squeezed, else None."""
    m = pattern.search(text or "")
    if m is None:
        return None
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return " ".join(text[start:end if end >= 0 else None].split())[:160]


def needs_real_gpu(text: str):
    return first_line(REAL_CUDA, text)
