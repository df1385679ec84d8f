"""Perplexity on consecutive non-overlapping windows (METHODS.md §9.1) and layer-wise errors."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    tokens: int
    nonfinite_windows: int

    def __str__(self):
        extra = f", {self.nonfinite_windows} non-finite windows excluded" if self.nonfinite_windows else ""
        return f"perplexity {self.ppl:.3f} over {self.windows} windows ({self.tokens} predicted tokens{extra})"


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device=None,
               progress: bool = True) -> PerplexityResult:
    """exp(mean NLL of every predicted token), fp32 logits; non-finite windows counted apart."""
    device = device or next(model.parameters()).device
    model.eval()
    total, tokens, bad = 0.0, 0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        bar.update(len(ids))
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double()
        per_window = nll.sum(1)
        finite = torch.isfinite(per_window)
        bad += int((~finite).sum())
        total += float(per_window[finite].sum())
        tokens += int(finite.sum()) * (ids.shape[1] - 1)
    bar.close()
    if tokens == 0:
        return PerplexityResult(math.nan, math.nan, len(windows), 0, bad)
    mean = total / tokens
    return PerplexityResult(math.exp(mean), mean, len(windows), tokens, bad)


def _layer_outputs(model, ids) -> list[torch.Tensor]:
    from .models import decoder_layers

    outs, handles = [], []
    for layer in decoder_layers(model):
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out: outs.append((out[0] if isinstance(out, tuple) else out).double())))
    try:
        model.base_model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


@torch.no_grad()
def layer_output_errors(reference_model, model, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """‖h_l − h_l^ref‖_F / ‖h_l^ref‖_F of each decoder layer's output over `windows`."""
    num = den = None
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        ref, out = _layer_outputs(reference_model, ids), _layer_outputs(model, ids)
        d = [float(((o - r.to(o.device)) ** 2).sum()) for o, r in zip(out, ref)]
        r2 = [float((r ** 2).sum()) for r in ref]
        num = d if num is None else [a + b for a, b in zip(num, d)]
        den = r2 if den is None else [a + b for a, b in zip(den, r2)]
    return [math.sqrt(a / b) for a, b in zip(num, den)]
