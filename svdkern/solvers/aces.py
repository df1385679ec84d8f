"""ACES: per-matrix CEALC weight β from the closed-form stationary points (METHODS.md §7.2).

The tail-energy ratio of G(β) = S + βD at rank r is approximated with S's rank-r subspaces held
fixed: ρ̃(β) = (a + 2bβ + cβ²) / (A + 2Bβ + Cβ²). Its stationary points solve
(cB − bC)β² + (cA − aC)β + (bA − aB) = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AcesCoefficients:
    a: float
    b: float
    c: float
    A: float
    B: float
    C: float

    def ratio(self, beta):
        """ρ̃(β) (works on floats and tensors)."""
        return (self.a + 2 * self.b * beta + self.c * beta ** 2) / (
            self.A + 2 * self.B * beta + self.C * beta ** 2)


def aces_coefficients(S: torch.Tensor, D: torch.Tensor, rank: int, svd=None) -> AcesCoefficients:
    """The six Frobenius products of S (= W P) and D (= W Δ P⁻ᵀ) at rank r (float64)."""
    S = S.double()
    D = D.double()
    if svd is None:
        U, s, Vh = torch.linalg.svd(S, full_matrices=False)
    else:
        U, s, Vh = svd.U, svd.S, svd.Vh
    Ur, Vr = U[:, :rank], Vh[:rank].T
    S_tail = S - (Ur * s[:rank]) @ Vr.T
    D_perp = D - Ur @ (Ur.T @ D)
    D_perp = D_perp - (D_perp @ Vr) @ Vr.T
    return AcesCoefficients(
        a=float((s[rank:] ** 2).sum()), b=float((S_tail * D).sum()), c=float((D_perp ** 2).sum()),
        A=float((S ** 2).sum()), B=float((S * D).sum()), C=float((D ** 2).sum()))


def aces_beta(coef: AcesCoefficients, beta_range=(0.25, 0.75), beta_cap: float = 0.95,
              shrink: float = 1.0) -> float:
    """β* minimizing ρ̃ over the interval: its interior stationary points and both ends."""
    lo, hi = beta_range
    if not (0.0 <= lo <= hi < 1.0):
        raise ValueError(f"aces range must satisfy 0 <= lo <= hi < 1; got {beta_range}")
    q2 = coef.c * coef.B - coef.b * coef.C
    q1 = coef.c * coef.A - coef.a * coef.C
    q0 = coef.b * coef.A - coef.a * coef.B
    roots = []
    scale = max(abs(q2), abs(q1), abs(q0), 1e-300)
    if abs(q2) <= 1e-12 * scale:
        if abs(q1) > 1e-12 * scale:
            roots.append(-q0 / q1)
    else:
        disc = q1 * q1 - 4 * q2 * q0
        if disc >= 0:
            sq = disc ** 0.5
            roots += [(-q1 + sq) / (2 * q2), (-q1 - sq) / (2 * q2)]
    candidates = [r for r in roots if lo <= r <= hi] + [lo, hi]
    candidates = [shrink * min(min(max(r, lo), hi), beta_cap) for r in candidates]
    return min(candidates, key=coef.ratio)
