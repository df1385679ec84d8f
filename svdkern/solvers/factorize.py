"""The per-matrix engine every method shares (METHODS.md §7b).

target G = W P + β W Δ P⁻ᵀ  →  SVD  →  keep r_i = k − r_r  →  U = Ũ√σ, V = √σ Ṽᵀ P⁻¹
optionally followed by ERC's residual stage: plain SVD of W − U V at rank r_r, concatenated.

Output-aware whitening weighs the output channels too: the SVD is of S G with S = diag(s) (s_i²:
how much the model's loss reacts to output i, sensitivity.output_weights) and U = S⁻¹ Ũ √σ, the
best rank-k fit of Σ_i s_i² ‖(W − W′)_i X‖² instead of the unweighted ‖(W − W′) X‖².

β = 0 is SVD-LLM / SC-SVD-LLM, fixed β is EP-SVD-LLM (α) / CEALC, per-matrix β is ACES.
Whitener None means plain truncated SVD of W (the floor baseline).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .whiten import Whitener


@dataclass
class TargetSVD:
    """SVD of the whitened target, kept so a rank can be chosen (or re-chosen) later."""

    U: torch.Tensor   # (m, r) left singular vectors
    S: torch.Tensor   # (r,) singular values, descending
    Vh: torch.Tensor  # (r, n) right singular vectors of the whitened target


def target(W: torch.Tensor, wh: Whitener | None, delta: torch.Tensor | None = None,
           beta: float = 0.0, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """G(β) = S (W P + β·W Δ P⁻ᵀ) (float64; S = diag(out_scale), else I); W when there is no whitening."""
    W = W.to(torch.float64)
    if wh is None:
        return W
    G = W @ wh.P
    if delta is not None and beta != 0.0:
        G = G + beta * wh.right_inv_t(W @ delta.to(torch.float64))
    return G if out_scale is None else out_scale.to(G)[:, None] * G


def visible_delta(delta: torch.Tensor, H: torch.Tensor, damp_rel: float) -> torch.Tensor:
    """Δ H (H + μI)⁻¹ (float64, μ = damp_rel·mean diag H): Δ without what the Gram cannot see.

    Δ = Σ δ x̂ᵀ lies in the span of the x̂ exactly, but its fp32 sums leave rounding along the
    Gram's (near-)null directions, which P⁻ᵀ then amplifies by 1/√damping: EP's factors moved
    10% with the thread count. Directions with energy well above μ pass unchanged, those below
    are damped away; they carry almost no calibration energy.
    """
    H = H.to(torch.float64)
    ridge = H + damp_rel * H.diagonal().mean().clamp_min(torch.finfo(H.dtype).tiny) * torch.eye(
        H.shape[0], dtype=H.dtype, device=H.device)
    return torch.cholesky_solve(H @ delta.to(H).T, torch.linalg.cholesky(ridge)).T


def svd_of(G: torch.Tensor, svd_dtype: torch.dtype = torch.float64) -> TargetSVD:
    U, S, Vh = torch.linalg.svd(G.to(svd_dtype), full_matrices=False)
    return TargetSVD(U.double(), S.double(), Vh.double())


def truncation_error(svd: TargetSVD, rank: int) -> float:
    """Share of the (whitened) target's energy the kept rank drops: Σ_{i≥r} σ_i² / Σ σ_i²."""
    energy = svd.S.square()
    return float(energy[rank:].sum() / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny))


def factors_from_svd(W: torch.Tensor, svd: TargetSVD, wh: Whitener | None, rank: int,
                     residual: int = 0, svd_dtype: torch.dtype = torch.float64,
                     out_scale: torch.Tensor | None = None):
    """Factors (U: m×rank, V: rank×n, float64) from a target SVD, with an optional REC stage.

    Stage 1 keeps rank − residual whitened components (U unscaled by the target's `out_scale`);
    stage 2 fits the weight-space residual W − U₁V₁ with a plain SVD at `residual` components
    (ERC-SVD, METHODS.md §6.1).
    """
    k1 = rank - residual
    if k1 < 1:
        raise ValueError(f"stage-1 rank must be >= 1 (rank {rank}, residual {residual})")
    root = svd.S[:k1].sqrt()
    U1 = svd.U[:, :k1] * root
    if out_scale is not None:
        U1 = U1 / out_scale.to(U1)[:, None]
    V1 = root[:, None] * svd.Vh[:k1]
    if wh is not None:
        V1 = wh.right_inv(V1)
    if residual == 0:
        return U1, V1
    R = W.to(torch.float64) - U1 @ V1
    Ur, Sr, Vhr = torch.linalg.svd(R.to(svd_dtype), full_matrices=False)
    root_r = Sr[:residual].double().sqrt()
    U2 = Ur[:, :residual].double() * root_r
    V2 = root_r[:, None] * Vhr[:residual].double()
    return torch.cat([U1, U2], dim=1), torch.cat([V1, V2], dim=0)


def factorize(W: torch.Tensor, wh: Whitener | None, rank: int, delta: torch.Tensor | None = None,
              beta: float = 0.0, residual: int = 0, svd_dtype: torch.dtype = torch.float64,
              out_scale: torch.Tensor | None = None):
    """Rank-`rank` factors of W minimizing the whitened (CEALC) objective; see module doc."""
    svd = svd_of(target(W, wh, delta, beta, out_scale), svd_dtype)
    return factors_from_svd(W, svd, wh, rank, residual, svd_dtype, out_scale)
