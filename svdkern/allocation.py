"""Rank allocation: from a global parameter budget to one rank per matrix (or dense).

Every policy is budget-exact: the parameters it keeps over the compressed linears never exceed
what the uniform rule keeps at the same ratio (METHODS.md §0). A rank of None means the matrix
stays dense: past its break-even rank, the rest of a matrix is one more step of the greedy
allocation, taken when its gain per parameter ranks high enough.

- `uniform_ranks`: every matrix at the ratio (today's default).
- `v2_ranks`: SVD-LLM V2's heterogeneous rule (METHODS.md §3.2), as a baseline.
- `water_fill`: greedy water-filling over all matrices of per-component importances (whitened
  spectra, weighted by measured end-to-end sensitivity in `sensitivity.py`), exact on budget.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .solvers.rank import RatioError, align_step, rank_for_ratio


@dataclass(frozen=True)
class MatrixShape:
    name: str
    m: int   # out features
    n: int   # in features


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the dense matrix."""
    return (m * n - 1) // (m + n)


def kept_parameters(shape: MatrixShape, rank: int | None) -> int:
    return shape.m * shape.n if rank is None else rank * (shape.m + shape.n)


def uniform_ranks(shapes: list[MatrixShape], ratio: float) -> dict:
    """Every matrix at `ratio`; ratio 0 (no compression) keeps every matrix dense."""
    if ratio == 0.0:
        return {s.name: None for s in shapes}
    return {s.name: rank_for_ratio(s.m, s.n, ratio, s.name) for s in shapes}


def budget_of(shapes: list[MatrixShape], ratio: float) -> int:
    """Parameters the uniform rule keeps at `ratio`: the budget every policy must meet."""
    ranks = uniform_ranks(shapes, ratio)
    return sum(kept_parameters(s, ranks[s.name]) for s in shapes)


def total_kept(shapes: list[MatrixShape], ranks: dict) -> int:
    return sum(kept_parameters(s, ranks[s.name]) for s in shapes)


def v2_ranks(shapes: list[MatrixShape], ratio: float, losses: dict[str, float],
             max_ratio: float = 0.95) -> dict[str, int]:
    """SVD-LLM V2: within each group of equal shapes, ratio ∝ 1/log(truncation loss).

    losses: each matrix's theoretical truncation loss at the uniform rank, on raw-sum statistics
    (must exceed 1, as the rule assumes). Clamped members are fixed and the rest re-normalized so
    the group's mean ratio stays `ratio`; ranks are floored, then trimmed to the budget where
    the floors of 1 overshoot it.
    """
    if ratio == 0.0:
        return uniform_ranks(shapes, ratio)
    groups: dict[tuple, list[MatrixShape]] = {}
    for s in shapes:
        groups.setdefault((s.name.split(".", 1)[-1], s.m, s.n), []).append(s)
    ranks = {}
    for members in groups.values():
        if any(losses[s.name] <= 1.0 for s in members):
            ranks.update(uniform_ranks(members, ratio))  # the 1/log rule is undefined there
            continue
        weight = {s.name: 1.0 / math.log(losses[s.name]) for s in members}
        fixed: dict[str, float] = {}
        while True:
            free = [s for s in members if s.name not in fixed]
            share = (len(members) * ratio - sum(fixed.values())) / sum(weight[s.name] for s in free)
            rho = {s.name: share * weight[s.name] for s in free}
            over = {k: v for k, v in rho.items() if v > max_ratio}
            if not over:
                break
            fixed.update({k: max_ratio for k in over})
        rho.update(fixed)
        for s in members:
            ranks[s.name] = max(1, math.floor((1 - rho[s.name]) * s.m * s.n / (s.m + s.n)))
    return fit_budget(shapes, ranks, budget_of(shapes, ratio))


def fit_budget(shapes, ranks: dict, budget: int) -> dict:
    """Trim ranks (relatively largest first) until the total is within budget.

    Rank rules that floor per matrix can still overshoot a global budget by a few ranks.
    """
    by_name = {s.name: s for s in shapes}
    ranks = dict(ranks)
    while total_kept(shapes, ranks) > budget:
        trimmable = [n for n, r in ranks.items() if r is not None and r > 1]
        if not trimmable:
            raise RatioError(f"no rank can be trimmed to meet the budget of {budget:,} parameters")
        name = max(trimmable, key=lambda n: ranks[n] * (by_name[n].m + by_name[n].n) / (by_name[n].m * by_name[n].n))
        ranks[name] -= 1
    return ranks


def align_within_budget(shapes: list[MatrixShape], ranks: dict, align, budget: int,
                        importance: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """(aligned ranks, {name: rank before alignment}) for the GPU kernels' aligned loads.

    Each rank is rounded down to its multiple (solvers.rank.align_step), then what that frees is
    given back: whole steps of `align`, to the matrices whose next step is worth most (by
    `importance` per parameter when given, else by how many ranks rounding took from them), while
    the total stays within `budget` and every matrix below its break-even rank. So the achieved
    ratio is the one asked for, within one step of the smallest aligned matrix.
    """
    by_name = {s.name: s for s in shapes}
    steps = {n: align_step(r, align) for n, r in ranks.items() if r is not None}
    out = {n: (r if r is None else r // steps[n] * steps[n]) for n, r in ranks.items()}
    spent = total_kept(shapes, out)

    def worth(name: str) -> float:
        s, r, a = by_name[name], out[name], steps[name]
        if importance is not None:
            imp = importance[name]
            return float(imp[r:r + a].sum()) / (a * (s.m + s.n))
        return (ranks[name] - r) * (s.m + s.n) / (a * (s.m + s.n))

    candidates = [n for n, a in steps.items() if a > 1]
    while True:
        fits = [n for n in candidates if spent + steps[n] * (by_name[n].m + by_name[n].n) <= budget
                and out[n] + steps[n] <= break_even_rank(by_name[n].m, by_name[n].n)]
        if not fits:
            break
        name = max(fits, key=lambda n: (worth(n), -candidates.index(n)))
        out[name] += steps[name]
        spent += steps[name] * (by_name[name].m + by_name[name].n)
    return out, {n: ranks[n] for n in steps if out[n] != ranks[n]}


def water_fill(shapes: list[MatrixShape], budget: int, importance: dict[str, torch.Tensor],
               min_rank: dict[str, int] | None = None, allow_dense: bool = True) -> dict:
    """Greedy allocation: keep the components with the most importance per parameter.

    importance[name][j]: the expected loss of dropping component j of that matrix (its whitened
    singular value squared, weighted by sensitivity). Components of one matrix are taken in order,
    so each matrix keeps a prefix of its spectrum. Past the break-even rank a matrix may go dense
    (cost: the rest of its m·n parameters, gain: the rest of its importance). Never over budget.
    """
    min_rank = min_rank or {}
    ranks: dict[str, int | None] = {}
    spent = 0
    heap = []
    for s in shapes:
        imp = importance[s.name].double().cpu()
        k0 = max(1, min_rank.get(s.name, 1))
        cap = break_even_rank(s.m, s.n)
        if k0 > cap:
            raise RatioError(f"minimum rank {k0} for {s.name} exceeds its break-even rank {cap}")
        ranks[s.name] = k0
        spent += k0 * (s.m + s.n)
        _push_next(heap, s, imp, k0, cap, allow_dense)
    if spent > budget:
        raise RatioError(f"the minimum ranks alone need {spent:,} parameters, over the budget of {budget:,}")
    while heap:
        _, _, name, cost, s, imp, kind = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this matrix's next step does not fit; nor will its later ones
        spent += cost
        if kind == "dense":
            ranks[name] = None
            continue
        ranks[name] += 1
        _push_next(heap, s, imp, ranks[name], break_even_rank(s.m, s.n), allow_dense)
    return ranks


def _push_next(heap, s: MatrixShape, imp: torch.Tensor, rank: int, cap: int, allow_dense: bool):
    if rank < min(cap, imp.numel()):
        cost = s.m + s.n
        gain = float(imp[rank])
        heapq.heappush(heap, (-gain / cost, s.name + f"#{rank}", s.name, cost, s, imp, "rank"))
    elif allow_dense and rank == cap:
        cost = s.m * s.n - rank * (s.m + s.n)
        gain = float(imp[rank:].sum())
        heapq.heappush(heap, (-gain / cost, s.name + "#dense", s.name, cost, s, imp, "dense"))
