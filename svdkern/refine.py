"""Block-level refinement: a few Adam steps on one block's U and V toward the FP block output.

The per-matrix solvers minimize each linear's own output error; the block's output error is what
the next block sees. After a block is compressed, its factors (and nothing else) are tuned on the
calibration activations: input = the stream the compressed model produces (so the steps also
absorb error propagated from earlier blocks; methods on the FP stream alone refine on FP
inputs), target = the original block's output on the FP stream. Micro-batches held out from the steps choose when to stop, and the state with the
lowest error on them is kept, so refinement never ends worse than it started on those windows.

Two recipes (`RECIPES`): svdkern's (Adam on the factors, the relative block error, the best state
on held-out batches) and AA-SVD's reference recipe (AdamW with weight decay 0.01 on every
parameter of the block, norms and biases included, mean squared error, 10% linear warm-up then
cosine decay to 0.1 of the rate, gradients clipped to norm 1, the last state kept, one step per
32 windows).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn as nn

from . import distributed
from .nn import LowRankLinear


@dataclass(frozen=True)
class Recipe:
    train_all: bool = False       # every parameter of the block (norms, biases), not only the factors
    weight_decay: float = 0.0     # AdamW's decoupled decay (0: plain Adam)
    mse: bool = False             # mean squared error instead of the relative error ‖f(x) − y‖²/‖y‖²
    schedule: bool = False        # 10% linear warm-up from 0, then cosine to 0.1 of the rate
    clip: float | None = None     # gradient norm clipping
    keep_best: bool = True        # the held-out batches pick the kept state; False: the last one
    step_windows: int | None = None  # windows per step (gradients accumulated); None: one micro-batch


RECIPES = {"svdkern": Recipe(),
           # its dataloader's batch of 32 windows per step: 2 steps per epoch on 64 windows
           "aa-svd": Recipe(train_all=True, weight_decay=0.01, mse=True, schedule=True, clip=1.0, keep_best=False,
                            step_windows=32)}


def aa_svd_schedule(step: int, total: int) -> float:
    """AA-SVD's rate factor: linear warm-up over the first 10% of steps (from 0), then cosine to 0.1."""
    warmup = int(0.1 * total)
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class RefineResult:
    before: float     # relative block error on the selection windows, before any step
    after: float      # the same after refinement (<= before)
    steps: int        # steps taken until the kept state
    selection: str    # "held-out" or "fit" windows


def _cast(obj, dtype):
    """Floating tensors (also inside tuples, lists, dicts) in `dtype`; everything else as is."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def relative_block_error(layer, run_layer, inputs, targets, kwargs, device) -> float:
    """‖f(x) − y‖² / ‖y‖² summed over micro-batches (float64), in the layer's own dtype; under
    torch.distributed over the micro-batches of all ranks."""
    dtype = next(layer.parameters()).dtype
    num = den = 0.0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs):
            out = run_layer(layer, x.to(device, dtype), _cast(kw, dtype)).double()
            y = y.to(device).double()
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
    num, den = distributed.summed_float(num, device), distributed.summed_float(den, device)
    return num / max(den, 1e-300)


def _columns(batches: list) -> tuple[list, list, list]:
    """(inputs, targets, kwargs) of (input, target, kwargs) triples; three empty lists for none
    (a rank that holds no selection batch still joins the error's all-reduce)."""
    return tuple(list(column) for column in zip(*batches)) if batches else ([], [], [])


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            params += [module.U, module.V]
    return params


def refine_block(layer: nn.Module, run_layer, inputs: list, targets: list, kwargs: list, *,
                 epochs: int, lr: float, holdout: int, device, global_batches: int | None = None,
                 recipe: Recipe = RECIPES["svdkern"], accumulate: int = 1) -> RefineResult:
    """Tune the LowRankLinear factors of `layer` in place; returns the errors before and after.

    inputs/targets/kwargs: one entry per calibration micro-batch. The last `holdout` micro-batches
    are never stepped on; they pick the kept state (evaluated after every pass over the rest).
    With holdout 0 the fit batches themselves pick it. `accumulate` consecutive micro-batches make
    one step (the mean of their losses), as a larger batch would.
    Under torch.distributed these are this rank's micro-batches of all ranks' `global_batches`: the
    steps still go through the global batches in order, each taken by the rank that holds the batch
    and its gradient broadcast, so every rank (and one process) makes the same Adam steps.
    """
    total = global_batches or len(inputs)
    if not 0 <= holdout < total:
        raise ValueError(f"refinement holdout must leave micro-batches to fit: {holdout} of {total}")
    local = {distributed.global_batch(j): batch for j, batch in enumerate(zip(inputs, targets, kwargs))}
    fit = list(range(total - holdout))  # global indices, stepped in this order
    select = [b for g, b in local.items() if g >= total - holdout] if holdout else [
        b for g, b in local.items() if g < total - holdout]
    params = factor_parameters(layer)
    if not params:
        raise ValueError("refinement found no LowRankLinear factors in the block")
    if recipe.train_all:
        params = list(layer.parameters())
    frozen = [(p, p.requires_grad, p.dtype) for p in layer.parameters()]
    original = [p.detach().clone() for p in params]
    layer.float()  # steps in fp32 whatever the model's dtype
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def error():
        return relative_block_error(layer, run_layer, *_columns(select), device)

    best = before = error()
    best_state, best_steps, steps = [p.detach().clone() for p in params], 0, 0
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay) if recipe.weight_decay
           else torch.optim.Adam(params, lr=lr))
    groups = [fit[i:i + accumulate] for i in range(0, len(fit), accumulate)]
    total_steps = epochs * len(groups)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda step: aa_svd_schedule(step, total_steps))
             if recipe.schedule else None)
    try:
        with torch.enable_grad():
            for epoch in range(epochs):
                for group in groups:
                    summed = [torch.zeros_like(p) for p in params] if len(group) > 1 else None
                    for g in group:
                        opt.zero_grad(set_to_none=False)
                        if g in local:
                            x, y, kw = local[g]
                            y = y.to(device).float()
                            out = run_layer(layer, x.to(device, torch.float32), _cast(kw, torch.float32))
                            err = ((out.float() - y) ** 2)
                            loss = err.mean() if recipe.mse else err.sum() / (y ** 2).sum()
                            (loss / len(group)).backward()
                        distributed.broadcast_grads(params, src=g % distributed.world())
                        if summed is not None:
                            for acc, p in zip(summed, params):
                                if p.grad is not None:
                                    acc += p.grad
                    if summed is not None:
                        for acc, p in zip(summed, params):
                            if p.grad is not None:
                                p.grad.copy_(acc)
                    if recipe.clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
                    opt.step()
                    if sched is not None:
                        sched.step()
                    steps += 1
                if not recipe.keep_best and epoch < epochs - 1:
                    continue  # only the last state is kept: no need to measure the others
                now = error()
                if now < best or not recipe.keep_best:
                    best, best_steps = now, steps
                    best_state = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
        for p, flag, dtype in frozen:
            p.data = p.data.to(dtype)
            p.requires_grad_(flag)
    if best_steps and recipe.keep_best and any(p.dtype != torch.float32 for p in params):
        # rounding back to the model's dtype can eat the gain: keep the original if it did
        best = relative_block_error(layer, run_layer, *_columns(select), device)
        if best > before:
            with torch.no_grad():
                for p, saved in zip(params, original):
                    p.copy_(saved)
            best, best_steps = relative_block_error(layer, run_layer, *_columns(select), device), 0
            before = best
    return RefineResult(before, best, best_steps, "held-out" if holdout else "fit")
