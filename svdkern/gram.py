"""What every layer of the Gram path shares: its errors, its finiteness check, and reading the
lower-triangle accumulators. The ops (_ops.py, backends) and the solvers (solvers/whiten.py)
both import it, so the arrows run one way: solvers -> ops -> gram."""
from __future__ import annotations

import torch


class GramNotFiniteError(ValueError):
    """A Gram matrix holds NaN or Inf: activations overflowed during calibration."""


class NotPositiveDefiniteError(RuntimeError):
    """A Gram matrix stayed non-positive-definite after the largest damping allowed."""


def check_finite_gram(H: torch.Tensor, name: str = "Gram matrix") -> None:
    if not bool(torch.isfinite(H).all()):
        raise GramNotFiniteError(
            f"{name} contains NaN or Inf: the calibration activations overflowed. Run the model "
            "in float32 (or bfloat16 rather than float16) for calibration, and check the data."
        )


def symmetrize(H_lower: torch.Tensor) -> torch.Tensor:
    """Full symmetric matrix from an accumulator whose lower triangle is valid."""
    return torch.tril(H_lower) + torch.tril(H_lower, -1).T
