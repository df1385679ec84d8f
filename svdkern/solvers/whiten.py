"""Whitening factors P with P Pᵀ = H + λI, applied by solves, never by explicit inverses.

Inputs right after RMSNorm make some Gram matrices nearly singular (λmin/λmax ≈ 4e-11 on
SmolLM2): a float32 Cholesky fails there, so factors are computed in float64 with relative
damping (METHODS.md §1.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._ops import cholesky_whiten
from ..gram import GramNotFiniteError, NotPositiveDefiniteError, check_finite_gram, symmetrize

__all__ = ["GramNotFiniteError", "NotPositiveDefiniteError", "Whitener", "check_finite_gram", "symmetrize", "whiten"]


@dataclass
class Whitener:
    """P (n×n) with P Pᵀ = H_damped; `lower` marks a Cholesky factor (triangular solves)."""

    P: torch.Tensor
    lower: bool
    damp: float = 0.0

    def right_inv(self, M: torch.Tensor) -> torch.Tensor:
        """M P⁻¹."""
        if self.lower:
            return torch.linalg.solve_triangular(self.P, M, upper=False, left=False)
        return torch.linalg.solve(self.P, M, left=False)

    def right_inv_t(self, M: torch.Tensor) -> torch.Tensor:
        """M P⁻ᵀ."""
        if self.lower:
            return torch.linalg.solve_triangular(self.P.T, M, upper=True, left=False)
        return torch.linalg.solve(self.P.T, M, left=False)


def whiten(H: torch.Tensor, method: str = "cholesky", damp_rel: float = 1e-6,
           max_damp_rel: float = 1e-2) -> Whitener:
    """Whitening factor of a full symmetric H (float64 math)."""
    H = H.to(torch.float64)
    if method == "cholesky":
        L, damp = cholesky_whiten(H, damp_rel, max_damp_rel)
        return Whitener(L, lower=True, damp=float(damp))
    check_finite_gram(H)
    if method == "eigh":
        evals, Q = torch.linalg.eigh(H)
        floor = damp_rel * evals.clamp_min(0).mean()
        return Whitener(Q * evals.clamp_min(floor).sqrt(), lower=False, damp=damp_rel)
    raise ValueError(f"unknown whitening {method!r}; use 'cholesky' or 'eigh'")
