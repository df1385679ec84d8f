"""Schemas and fake (meta) implementations of svdkern's ops, registered with torch.library.

The torch implementations are registered for every device (CompositeExplicitAutograd); the
optional compiled extension adds CUDA kernels under the same names, which the dispatcher
prefers for CUDA tensors. Fakes let torch.compile trace every op.
"""
from __future__ import annotations

import torch

from .backends import gram_impl, torch_ops, use_triton_lowrank
from .gram import check_finite_gram

_lib = torch.library.Library("svdkern", "DEF")
_lib.define("lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias=None) -> Tensor")
_lib.define("gram_accumulate(Tensor(a!) H, Tensor X) -> ()")
_lib.define("cross_accumulate(Tensor(a!) D, Tensor delta, Tensor X) -> ()")
_lib.define(
    "cholesky_whiten(Tensor H, float damp_rel=1e-6, float max_damp_rel=1e-2) -> (Tensor, Tensor)"
)


def _lowrank_linear_impl(x, U, V, bias=None):
    if use_triton_lowrank(x):
        from .backends.triton_lowrank import lowrank_linear as triton_lowrank_linear

        return triton_lowrank_linear(x, U, V, bias)
    return torch_ops.lowrank_linear(x, U, V, bias)


_lib.impl("lowrank_linear", _lowrank_linear_impl, "CompositeExplicitAutograd")
_lib.impl("gram_accumulate", torch_ops.gram_accumulate, "CompositeExplicitAutograd")
_lib.impl("cross_accumulate", torch_ops.cross_accumulate, "CompositeExplicitAutograd")
_lib.impl("cholesky_whiten", torch_ops.cholesky_whiten, "CompositeExplicitAutograd")


@torch.library.register_fake("svdkern::lowrank_linear")
def _lowrank_linear_fake(x, U, V, bias=None):
    torch._check(x.shape[-1] == V.shape[1], lambda: "x and V disagree on in_features")
    torch._check(V.shape[0] == U.shape[1], lambda: "U and V disagree on rank")
    return x.new_empty((*x.shape[:-1], U.shape[0]))


@torch.library.register_fake("svdkern::gram_accumulate")
def _gram_accumulate_fake(H, X):
    return None


@torch.library.register_fake("svdkern::cross_accumulate")
def _cross_accumulate_fake(D, delta, X):
    return None


@torch.library.register_fake("svdkern::cholesky_whiten")
def _cholesky_whiten_fake(H, damp_rel=1e-6, max_damp_rel=1e-2):
    return H.new_empty(H.shape, dtype=torch.float64), H.new_empty(H.shape[:-2], dtype=torch.float64)


def _check_gram_args(H, X, what="H"):
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{what} must be a square matrix; got shape {tuple(H.shape)}")
    if H.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{what} must be float32 or float64 (the accumulator); got {H.dtype}")
    if X.shape[-1] != H.shape[1]:
        raise ValueError(f"X has {X.shape[-1]} channels but {what} is {H.shape[0]}x{H.shape[1]}")
    if X.device != H.device:
        raise ValueError(f"X is on {X.device} but {what} is on {H.device}")


def lowrank_linear(x, U, V, bias=None):
    """y = U (V x) + b, fused on CUDA (Triton), two matmuls elsewhere.

    Args:
        x: (..., n) fp16/bf16/fp32, any leading dims.
        U: (m, k), V: (k, n) in x's dtype; k may be two concatenated factor pairs (REC).
        bias: optional (m,).
    Returns:
        (..., m) in x's dtype; accumulation is fp32. Does not mutate or sync.
    """
    return torch.ops.svdkern.lowrank_linear(x, U, V, bias)


def gram_accumulate(H, X):
    """H += XᵀX in place, lower triangle only (read it with `svdkern.gram.symmetrize`).

    Args:
        H: (n, n) fp32 or fp64 accumulator, mutated.
        X: (..., n) fp16/bf16/fp32 activations; accumulated in H's dtype.
    """
    _check_gram_args(H, X)
    if X.is_cuda and gram_impl() == "blas":
        torch_ops.gram_accumulate(H, X)
    else:
        torch.ops.svdkern.gram_accumulate(H, X)


def cross_accumulate(D, delta, X):
    """D += δᵀX in place (every entry): the cross term Δ of the two-stream methods."""
    _check_gram_args(D, X, "D")
    if delta.shape != X.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and X {tuple(X.shape)} must have one shape")
    if delta.dtype != X.dtype:  # the CUDA kernel reads both with one type; checked on every backend
        raise TypeError(f"delta ({delta.dtype}) and X ({X.dtype}) must share one dtype: cast both, "
                        "e.g. to float32")
    if X.is_cuda and gram_impl() == "blas":
        torch_ops.cross_accumulate(D, delta, X)
    else:
        torch.ops.svdkern.cross_accumulate(D, delta, X)


def cholesky_whiten(H, damp_rel=1e-6, max_damp_rel=1e-2):
    """Damped lower Cholesky factors of a batch of symmetric PSD matrices, in float64.

    Each member gets H + μ·mean(diag H)·I with μ = damp_rel, raised x10 (only for the members
    that failed) until the factorization succeeds, up to max_damp_rel.
    Returns (L, damp). Raises NotPositiveDefiniteError past max_damp_rel; NaN/Inf raise
    GramNotFiniteError. Apply P⁻¹ by triangular solves (svdkern.solvers.whiten), never an inverse.
    """
    check_finite_gram(H)
    return torch.ops.svdkern.cholesky_whiten(H, float(damp_rel), float(max_damp_rel))


def _register_compiled_kernels():
    """Importing the extension registers its CUDA kernels for the ops defined above."""
    from .backends.cuda_ext import has_cuda_ext

    has_cuda_ext()


_register_compiled_kernels()
