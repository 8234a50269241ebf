"""Loaded by every Python process of a GPU-check rehearsal (scripts/gpu-check.sh
--rehearse puts this folder first on PYTHONPATH): torch reports CUDA present
with one device, as on the GPU machine, so every default that follows CUDA
(NCCL for local ranks, --device auto, backend and engine choices, tests'
skip conditions) takes the GPU machine's branch. Nothing runs on a GPU: the
first real use of CUDA raises NO_GPU, which the rehearsal's pytest plugin
(rehearsal_plugin.py) turns into a skip. Triton kernels on CPU tensors run in
its interpreter (TRITON_INTERPRET=1, set by the rehearsal).

Active only when SAMPA_GPU_CHECK_REHEARSE=1.
"""
import importlib.abc
import importlib.machinery
import os
import sys

from real_cuda import NO_GPU  # noqa: E402  (this folder is on sys.path)


def _patch(torch) -> None:
    cuda = torch.cuda

    def lazy_init():
        raise RuntimeError(f"{NO_GPU} (torch.cuda initialisation)")

    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda._lazy_init = lazy_init
    cuda.is_initialized = lambda: False


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches torch right after `import torch` has run, before anything uses it."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("SAMPA_GPU_CHECK_REHEARSE") == "1":
    if "torch" in sys.modules:
        _patch(sys.modules["torch"])
    else:
        sys.meta_path.insert(0, _Finder())
