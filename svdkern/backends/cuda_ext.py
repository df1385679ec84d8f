"""The optional compiled extension (csrc/): CUDA kernels for gram/cross accumulation and
batched Cholesky whitening, registered under the svdkern:: ops for the CUDA dispatch key.
SVDKERN_CUDA_EXT=0 leaves it unloaded (the PyTorch fallbacks then serve CUDA tensors too)."""
from __future__ import annotations

import functools
import importlib
import os


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("SVDKERN_CUDA_EXT", "1") == "0":
        return None, ImportError("disabled by SVDKERN_CUDA_EXT=0")
    try:
        return importlib.import_module("svdkern._C"), None
    except ImportError as exc:
        return None, exc


def has_cuda_ext() -> bool:
    """True when the compiled CUDA extension loaded (its kernels then serve CUDA tensors)."""
    return _load()[0] is not None


def load_error():
    return _load()[1]
