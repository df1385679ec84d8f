"""Implementations of svdkern's ops per device, and the one place that picks among them.

`SVDKERN_IMPL=torch|triton` forces the low-rank linear path (tests use `triton` with
`TRITON_INTERPRET=1` to run the real kernels on CPU tensors). `SVDKERN_GRAM=blas|ext` picks the
Gram/cross-term path on CUDA: blocked cuBLAS panels (lower triangle only) or the compiled
extension's hand kernels (benchmarks/bench_stats.py measures both).
"""
from __future__ import annotations

import functools
import os

import torch


def requested_impl() -> str:
    impl = os.environ.get("SVDKERN_IMPL", "auto").lower()
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"SVDKERN_IMPL must be auto, torch or triton; got {impl!r}")
    return impl


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton_lowrank(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors when importable; forced on any device by SVDKERN_IMPL=triton."""
    impl = requested_impl()
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("SVDKERN_IMPL=triton but triton is not installed (pip install triton)")
        return True
    return x.is_cuda and triton_available()


def gram_impl() -> str:
    """blas (default: cuBLAS with tensor-core products is expected to beat the hand WMMA kernel,
    which has scalar loads and no async copies) or ext, the compiled kernels."""
    impl = os.environ.get("SVDKERN_GRAM", "blas").lower()
    if impl not in ("blas", "ext"):
        raise ValueError(f"SVDKERN_GRAM must be blas or ext; got {impl!r}")
    return impl
