"""Float64 ground truth for every op, shared by tests and benchmarks.

Nothing here is fast; it is written to be obviously right.
"""
from __future__ import annotations

import torch


def lowrank_linear_ref(x, U, V, bias=None):
    """y = U (V x) + b in float64 (x: (..., n), V: (k, n), U: (m, k), bias: (m,))."""
    y = (x.double() @ V.double().T) @ U.double().T
    return y if bias is None else y + bias.double()


def gram_ref(X):
    """XᵀX in float64 for X of shape (tokens, n)."""
    X = X.reshape(-1, X.shape[-1]).double()
    return X.T @ X


def cross_ref(delta, X):
    """δᵀX in float64 (rows: δ's channels, columns: X's channels)."""
    return delta.reshape(-1, delta.shape[-1]).double().T @ X.reshape(-1, X.shape[-1]).double()


def damped_cholesky_ref(H, damp_rel):
    """Lower Cholesky factor of H + damp_rel * mean(diag H) * I, in float64."""
    H = H.double()
    n = H.shape[-1]
    scale = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(n, dtype=torch.float64, device=H.device)
    return torch.linalg.cholesky(H + (damp_rel * scale)[..., None, None] * eye)
