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
    """‖f(x) − y‖² / ‖y‖² summed over micro-batches (float64), in the layer's own dtype."""
    dtype = next(layer.parameters()).dtype
    num = den = 0.0
    with torch.no_grad():
        for x, y, kw in zip(inputs, targets, kwargs):
            out = run_layer(layer, x.to(device, dtype), _cast(kw, dtype)).double()
            y = y.to(device).double()
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
    return num / max(den, 1e-300)


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            params += [module.U, module.V]
    return params


def refine_block(layer: nn.Module, run_layer, inputs: list, targets: list, kwargs: list, *,
                 epochs: int, lr: float, holdout: int, device) -> RefineResult:
    """Tune the LowRankLinear factors of `layer` in place; returns the errors before and after.

    inputs/targets/kwargs: one entry per calibration micro-batch. The last `holdout` micro-batches
    are never stepped on; they pick the kept state (evaluated after every pass over the rest).
    With holdout 0 the fit batches themselves pick it.
    """
    if not 0 <= holdout < len(inputs):
        raise ValueError(f"refinement holdout must leave micro-batches to fit: {holdout} of {len(inputs)}")
    fit = list(zip(inputs, targets, kwargs))[: len(inputs) - holdout]
    select = list(zip(inputs, targets, kwargs))[len(inputs) - holdout:] if holdout else fit
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
        return relative_block_error(layer, run_layer, *zip(*select), device)

    best = before = error()
    best_state, best_steps, steps = [p.detach().clone() for p in params], 0, 0
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for x, y, kw in fit:
                    y = y.to(device).float()
                    out = run_layer(layer, x.to(device, torch.float32), _cast(kw, torch.float32))
                    loss = ((out.float() - y) ** 2).sum() / (y ** 2).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
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
        best = relative_block_error(layer, run_layer, *zip(*select), device)
        if best > before:
            with torch.no_grad():
                for p, saved in zip(params, original):
                    p.copy_(saved)
            best, best_steps = relative_block_error(layer, run_layer, *zip(*select), device), 0
            before = best
    return RefineResult(before, best, best_steps, "held-out" if holdout else "fit")
