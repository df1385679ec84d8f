"""Calibration statistics per input group, streamed one micro-batch at a time.

One Gram matrix per distinct input (q/k/v share one; gate/up share one), accumulated in fp32
with TF32 off, lower triangle only (METHODS.md §1.2). The two-stream methods add the cross
term Δ = Σ δᵀx̂ with δ = x_fp − x̂, accumulated from δ directly: X_f ≈ X̂ early in the model,
and the difference of two large Gram matrices would cancel catastrophically in fp32.
"""
from __future__ import annotations

import torch

from ._ops import cross_accumulate, gram_accumulate
from .clock import timed
from .distributed import summed, summed_count
from .gram import symmetrize


class ActivationNotFiniteError(ValueError):
    """Calibration activations hold NaN/Inf."""


def check_finite_accumulator(A: torch.Tensor, where: str) -> None:
    """Raise if any activation summed into A was NaN/Inf (or overflowed the sum).

    A non-finite entry of column j of x makes the diagonal entry A[j, j] = Σ x_j·y_j non-finite
    (NaN·y = NaN, Inf·0 = NaN), so n checks replace one pass over every activation (which cost
    ~10% of a compression on the CPU).
    """
    if not bool(torch.isfinite(A.diagonal()).all()):
        raise ActivationNotFiniteError(
            f"calibration activations at {where} contain NaN or Inf; the model overflows on this "
            "data in its current dtype. Load it in float32 (or bfloat16), or check the input text."
        )


class GramStats:
    """H = Σ xᵀx (lower triangle) and the token count for one input group."""

    def __init__(self, n: int, device=None, dtype=torch.float32, name: str = "input"):
        self.H = torch.zeros(n, n, device=device, dtype=dtype)
        self.count = 0
        self.name = name

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        with _no_tf32(), timed("statistics"):
            gram_accumulate(self.H, x)
        self.count += x.shape[0]

    def merged(self, other: "GramStats") -> "GramStats":
        """The statistics of both token sets together."""
        both = GramStats(0, name=self.name)
        both.H, both.count = self.H + other.H, self.count + other.count
        return both

    def mean(self) -> torch.Tensor:
        """H̄ = H/N, full and symmetric, float64 (summed over the ranks of a process group)."""
        H, count = summed(self.H), summed_count(self.count, self.H.device)
        if count == 0:
            raise RuntimeError(f"no calibration tokens reached {self.name}")
        check_finite_accumulator(H, self.name)
        return symmetrize(H.double()) / count


class CrossStats:
    """Δ = Σ δᵀx̂ (every entry) for one input group of the two-stream methods."""

    def __init__(self, n: int, device=None, dtype=torch.float32, name: str = "input"):
        self.D = torch.zeros(n, n, device=device, dtype=dtype)
        self.count = 0
        self.name = name

    def add(self, x_fp: torch.Tensor, x_hat: torch.Tensor) -> None:
        with _no_tf32(), timed("statistics"):
            x_hat = x_hat.float()  # δ needs fp32 (x_fp ≈ x̂ early on); the kernel takes one dtype
            delta = (x_fp.float() - x_hat).reshape(-1, x_hat.shape[-1])
            cross_accumulate(self.D, delta, x_hat.reshape(-1, x_hat.shape[-1]))
        self.count += delta.shape[0]

    def merged(self, other: "CrossStats") -> "CrossStats":
        both = CrossStats(0, name=self.name)
        both.D, both.count = self.D + other.D, self.count + other.count
        return both

    def mean(self) -> torch.Tensor:
        D, count = summed(self.D), summed_count(self.count, self.D.device)
        check_finite_accumulator(D, self.name)  # δ = x_fp − x̂: catches the FP stream's too
        return D.double() / count


class _no_tf32:
    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
