"""Ranks from compression ratios (METHODS.md §0, §6.1, §6.2)."""
from __future__ import annotations

import math


RANK_ALIGNS = ("auto", 1, 8, 16, 32, 64)
AUTO_ALIGN_MAX_LOSS = 0.02


class RatioError(ValueError):
    """A compression ratio or rank that cannot produce a smaller layer."""


def check_ratio(ratio: float, what: str = "ratio") -> float:
    ratio = float(ratio)
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise RatioError(
            f"{what} must lie strictly between 0 and 1 (the fraction of parameters removed); "
            f"got {ratio}. Use e.g. 0.2 to remove 20% of each compressed matrix."
        )
    return ratio


def rank_for_ratio(m: int, n: int, ratio: float, name: str = "matrix") -> int:
    """k = floor((1 - ratio) * m*n/(m+n)): the rank whose factors hold (1 - ratio) of m*n."""
    check_ratio(ratio)
    k = int(math.floor((1.0 - ratio) * m * n / (m + n)))
    if k < 1:
        max_ratio = 1.0 - (m + n) / (m * n)
        raise RatioError(
            f"ratio {ratio} leaves rank 0 for {name} ({m}x{n}); the largest ratio that keeps "
            f"rank 1 there is {max_ratio:.4f}"
        )
    check_saves_parameters(m, n, k, name)
    return k


def align_step(rank: int, align) -> int:
    """The multiple a rank is aligned to (1: left as it is).

    Ranks that are multiples of 8 give the GPU kernels 16-byte (vectorized, async) loads of U and
    the intermediate; multiples of 64 also whole K tiles. "auto" takes the largest of 64/32/16/8
    whose rounding down drops at most 2% of the rank (the weakest directions), else none. A rank
    smaller than `align` is left as it is.
    """
    if align == "auto":
        for a in (64, 32, 16, 8):
            down = rank // a * a
            if down >= a and rank - down <= AUTO_ALIGN_MAX_LOSS * rank:
                return a
        return 1
    if align not in RANK_ALIGNS:
        raise ValueError(f"rank alignment must be one of {RANK_ALIGNS}; got {align!r}")
    return align if rank >= align else 1


def aligned_rank(rank: int, align) -> int:
    """The rank rounded down to a multiple of `align_step(rank, align)`."""
    step = align_step(rank, align)
    return rank // step * step


def check_saves_parameters(m: int, n: int, k: int, name: str = "matrix") -> None:
    if k < 1:
        raise RatioError(f"rank must be at least 1 for {name}; got {k}")
    if k * (m + n) >= m * n:
        raise RatioError(
            f"rank {k} for {name} ({m}x{n}) would not save parameters: factors hold "
            f"{k * (m + n)} >= {m * n}; use a rank below {m * n / (m + n):.1f} (a larger ratio)"
        )


def residual_rank(m: int, n: int, total_rank: int, residual_beta: float) -> int:
    """ERC's residual rank r_r = floor(beta * mn/(m+n)), zero when stage 1 would be left empty."""
    if residual_beta <= 0:
        return 0
    rr = int(math.floor(residual_beta * m * n / (m + n)))
    return rr if total_rank - rr >= 1 else 0


def plc_layer_ratio(num_layers: int, overall_ratio: float, compressed_layers: int) -> float:
    """PLC: compress only the last k of N layers at N*R/k, removing exactly N*R layers' worth."""
    return num_layers * overall_ratio / compressed_layers


def plc_candidates(num_layers: int, overall_ratio: float, step: int, residual_beta: float) -> list[int]:
    """Feasible PLC layer counts {step, 2*step, ...} plus N, with r_i >= 1 (METHODS.md §6.2)."""
    if step < 1:
        raise RatioError(f"plc step must be a positive number of layers; got {step}")
    limit = 1.0 - residual_beta - 0.01
    ks = sorted(set(range(step, num_layers, step)) | {num_layers})
    feasible = [k for k in ks if plc_layer_ratio(num_layers, overall_ratio, k) <= limit]
    if not feasible:
        raise RatioError(
            f"no PLC layer count is feasible for ratio {overall_ratio} over {num_layers} layers "
            f"(each layer ratio must stay <= {limit:.2f}); lower the ratio"
        )
    return feasible
