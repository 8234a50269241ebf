"""Loading the compiled extension `sampa_fused._C` (built by setup.py).

The package works without it: features that need it say so clearly.
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (libc10 must be loaded before the extension)

_ext = None
_error: Exception | None = None


def load_extension(required: bool = True, feature: str = "this feature"):
    """Return the `sampa_fused._C` module, or None (or raise) when it is not built."""
    global _ext, _error
    if _ext is None and _error is None:
        try:
            _ext = importlib.import_module("sampa_fused._C")
        except ImportError as e:  # not built: a pure-Python install
            _error = e
    if _ext is None and required:
        raise RuntimeError(
            f"{feature} needs the compiled extension sampa_fused._C, which is not "
            f"built here ({_error}). Build it from the repository root with "
            "`pip install --no-build-isolation -e .` (CUDA_HOME must point at nvcc "
            "for the CUDA parts).")
    return _ext


def has_cuda_ops() -> bool:
    ext = load_extension(required=False)
    return bool(ext is not None and getattr(ext, "has_cuda", lambda: False)())
