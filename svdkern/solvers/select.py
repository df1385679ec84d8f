"""Choosing the compensation strength β per matrix on held-out calibration micro-batches.

The quantity EP/CEALC trade off is the output error against the FP model on the inputs the
compressed model produces, E‖W x_f − Ŵ x̂‖². On held-out tokens it needs only their Ĥ and Δ:
E‖W x_f − Ŵ x̂‖² = const − 2⟨W(Ĥ + Δ), Ŵ⟩ + tr(Ŵ Ĥ Ŵᵀ), the constant being free of Ŵ.
Each β of the grid is fitted on the other micro-batches and scored on the held-out ones, so a strength that
only over-fits the calibration Δ loses (METHODS.md §5.3: α is not monotone in quality).
"""
from __future__ import annotations

import torch

from .factorize import factors_from_svd, svd_of, target
from .whiten import Whitener


def heldout_output_error(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, H_val: torch.Tensor,
                         D_val: torch.Tensor) -> float:
    """E‖W x_f − U V x̂‖² on held-out statistics, up to a constant that does not depend on U, V."""
    W, U, V = W.double(), U.double(), V.double()
    quad = ((V @ H_val @ V.T) * (U.T @ U)).sum()
    cross = (V * (U.T @ (W @ (H_val + D_val)))).sum()
    return float(quad - 2 * cross)


def select_beta(W: torch.Tensor, wh_fit: Whitener, D_fit: torch.Tensor, H_val: torch.Tensor,
                D_val: torch.Tensor, rank: int, residual: int, grid, svd_dtype=torch.float64):
    """(β of `grid` with the lowest held-out output error, {β: error})."""
    errors = {}
    for beta in grid:
        svd = svd_of(target(W, wh_fit, D_fit, beta), svd_dtype)
        U, V = factors_from_svd(W, svd, wh_fit, rank, residual, svd_dtype)
        errors[float(beta)] = heldout_output_error(W, U, V, H_val, D_val)
    return min(errors, key=errors.get), errors
