"""Block-level refinement: a few Adam steps on one block's U and V toward the FP block output.

The per-matrix solvers minimize each linear's own output error; the block's output error is what
the next block sees. After a block is compressed, its factors (and nothing else) are tuned on the
calibration activations: input = the stream the compressed model produces (so the steps also
absorb error propagated from earlier blocks; methods on the FP stream alone refine on FP
inputs), target = the original block's output on the FP stream. Micro-batches held out from the steps choose when to stop, and the state with the
lowest error on them is kept, so refinement never ends worse than it started on those windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import distributed
from .nn import LowRankLinear


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
                 epochs: int, lr: float, holdout: int, device, global_batches: int | None = None) -> RefineResult:
    """Tune the LowRankLinear factors of `layer` in place; returns the errors before and after.

    inputs/targets/kwargs: one entry per calibration micro-batch. The last `holdout` micro-batches
    are never stepped on; they pick the kept state (evaluated after every pass over the rest).
    With holdout 0 the fit batches themselves pick it.
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
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for g in fit:
                    opt.zero_grad(set_to_none=False)
                    if g in local:
                        x, y, kw = local[g]
                        y = y.to(device).float()
                        out = run_layer(layer, x.to(device, torch.float32), _cast(kw, torch.float32))
                        loss = ((out.float() - y) ** 2).sum() / (y ** 2).sum()
                        loss.backward()
                    distributed.broadcast_grads(params, src=g % distributed.world())
                    opt.step()
                    steps += 1
                now = error()
                if now < best:
                    best, best_steps = now, steps
                    best_state = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
        for p, flag, dtype in frozen:
            p.data = p.data.to(dtype)
            p.requires_grad_(flag)
    if best_steps and any(p.dtype != torch.float32 for p in params):
        # rounding back to the model's dtype can eat the gain: keep the original if it did
        best = relative_block_error(layer, run_layer, *_columns(select), device)
        if best > before:
            with torch.no_grad():
                for p, saved in zip(params, original):
                    p.copy_(saved)
            best, best_steps = relative_block_error(layer, run_layer, *_columns(select), device), 0
            before = best
    return RefineResult(before, best, best_steps, "held-out" if holdout else "fit")
