"""Measurements that rank allocation needs before any layer is compressed.

- `output_fisher`: for every compressible linear, Σ over calibration tokens of (∂loss/∂y_i)² per
  output channel i: how much the model's calibration loss reacts to an error in that output
  (the diagonal empirical Fisher), carried back through the layers one at a time; only
  activations get gradients, never weights. `output_weights` turns it into the per-output
  scales of output-aware whitening (solvers/factorize.py).
- `whitened_spectra`: one FP pass, layer by layer, that whitens every group and takes each
  matrix's SVD, keeping only per-component numbers (never the factors), so memory stays that of
  one layer. With Fisher weights, component j of W·P (σ_j, u_j) costs about
  ½·σ_j²·Σ_i f_i u_ij² of calibration loss when dropped: the importance `water_fill` ranks by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .blocks import capture_layer_inputs, group_grams, propagate, run_layer
from .head import chunked_sum, final_hidden, head_only
from .models import Architecture
from .solvers.factorize import svd_of, target
from .solvers.whiten import whiten


def output_fisher(model, store, arch: Architecture, windows: torch.Tensor, batch_size: int,
                  device, offload, progress: bool = True, total: int | None = None) -> dict[str, torch.Tensor]:
    """{"layer.name": (out_features,) float64 Σ_t (∂L/∂y_t)²}, L = mean next-token loss over `total`
    windows (default: these; under torch.distributed this rank's share, the sums all-reduced).

    Layer by layer, like the other passes (`store` holds the layers, layer_store.py): a forward
    pass keeps every layer's input; the head's gradient is then carried back one layer at a
    time, each layer recomputing its forward from its kept input. Memory: one layer and its
    graph on the device, and the inputs of all layers for `windows` (on `offload`).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only activations get gradients (a fetched layer inherits this)
    try:
        fisher = _fisher(model, store, arch, windows, batch_size, device, offload, progress,
                         total or len(windows))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if distributed.world() > 1:  # a rank without a sample batch adds zeros
        for i, layer in enumerate(store.layers):
            for name in (n for g in arch.groups for n in g):
                key = f"{i}.{name}"
                zeros = torch.zeros(layer.get_submodule(name).out_features, dtype=torch.float64, device=device)
                fisher[key] = distributed.summed(fisher[key].to(device) if key in fisher else zeros).cpu()
    return fisher


def output_weights(fisher: torch.Tensor, power: float, floor: float = 1e-3) -> torch.Tensor:
    """Per-output scales s (float64, s_i² = (f_i / mean f)^power) for output-aware whitening.

    A channel the calibration never moved (f_i ≈ 0) is floored at `floor`·mean: its outputs still
    count a little, and S⁻¹ in U stays bounded. power < 1 softens a Fisher estimated on few windows.
    """
    f = fisher.to(torch.float64)
    relative = (f / f.mean().clamp_min(torch.finfo(f.dtype).tiny)).clamp_min(floor)
    return relative.pow(power / 2)


def _fisher(model, store, arch, windows, batch_size, device, offload, progress, total):
    inputs = capture_layer_inputs(model, store.layers, windows, batch_size, device, offload)
    kept = [inputs.hidden]
    for i in tqdm(range(len(store)), desc="sensitivity forward", unit="layer", disable=not progress):
        layer = store.fetch(i)
        kept.append(propagate(layer, kept[-1], inputs.kwargs[i], device, offload))
        store.put_back(i, layer)
    grads = []
    with torch.enable_grad(), head_only(store.layers) as head:
        for b, start in enumerate(range(0, len(windows), batch_size)):
            ids = windows[start:start + batch_size].to(device)
            head.value = kept[-1][b].to(device).requires_grad_(True)
            last = final_hidden(model, ids)  # the final norm; the head runs in token chunks
            loss = chunked_sum(model, last[:, :-1], _summed_cross_entropy, ids[:, 1:])
            (loss / (ids.shape[1] - 1) / total).backward()
            grads.append(head.value.grad.to(offload))
    fisher = {}
    for i in tqdm(reversed(range(len(store))), total=len(store), desc="sensitivity backward",
                  unit="layer", disable=not progress):
        layer = store.fetch(i)
        handles = [layer.get_submodule(name).register_forward_hook(_square_grads(fisher, f"{i}.{name}"))
                   for name in (n for g in arch.groups for n in g)]
        try:
            with torch.enable_grad():
                for b, grad in enumerate(grads):
                    x = kept[i][b].to(device).requires_grad_(True)
                    run_layer(layer, x, inputs.kwargs[i][b]).backward(grad.to(device))
                    grads[b] = x.grad.to(offload)
        finally:
            for h in handles:
                h.remove()
        kept.pop()
        store.put_back(i, layer)
    return fisher


def _summed_cross_entropy(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum")


def _square_grads(fisher: dict, key: str):
    """A forward hook whose output's gradient adds Σ_t g_t² per output channel to fisher[key]."""
    def forward_hook(_module, _args, out):
        out.register_hook(lambda g: fisher.__setitem__(
            key, fisher.get(key, 0) + g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0)))
    return forward_hook


@dataclass
class Spectrum:
    sigma2: torch.Tensor               # (r,) squared singular values of W·P (P from mean H)
    weighted: torch.Tensor | None      # (r,) σ_j²·Σ_i f_i u_ij², when Fisher weights were given
    tokens: int                        # calibration tokens behind the Gram matrix


@torch.no_grad()
def whitened_spectra(store, arch: Architecture, hidden: list, kwargs: list, cfg, device, offload,
                     fisher: dict | None, progress: bool = True, ckpt=None) -> dict[str, Spectrum]:
    """Per-component numbers of every matrix's whitened SVD on the FP stream (see module doc).

    ckpt (a checkpoint.Checkpoint): each layer's spectra and the stream after it are saved, and an
    interrupted pass resumes from its last saved layer."""
    start, spectra = 0, {}
    saved = ckpt.load_spectra() if ckpt is not None else None
    if saved is not None:
        start, hidden, kept = saved
        hidden = [h.to(offload) for h in hidden]
        spectra = {k: Spectrum(*v) for k, v in kept.items()}
    for i in tqdm(range(start, len(store)), desc="spectra", disable=not progress, initial=start, total=len(store)):
        layer = store.fetch(i)
        with group_grams(layer, arch, device, f"{i}.") as stats:
            hidden = [run_layer(layer, h.to(device), kw).to(offload) for h, kw in zip(hidden, kwargs[i])]
        for group, st in zip(arch.groups, stats):
            wh = whiten(st.mean(), cfg.whitening, cfg.damp_rel, cfg.max_damp_rel)
            tokens = distributed.summed_count(st.count, device)  # all ranks' tokens
            for name in group:
                key = f"{i}.{name}"
                svd = svd_of(target(layer.get_submodule(name).weight.detach(), wh), cfg.svd_dtype)
                sigma2 = svd.S ** 2
                weighted = None
                if fisher is not None:
                    f = fisher[key].to(svd.U.device)
                    weighted = sigma2 * (svd.U ** 2 * f[:, None]).sum(0)
                spectra[key] = Spectrum(sigma2.cpu(), None if weighted is None else weighted.cpu(), tokens)
        store.put_back(i, layer)
        if ckpt is not None:
            ckpt.save_spectra(i + 1, hidden, {k: (v.sigma2, v.weighted, v.tokens) for k, v in spectra.items()})
    return spectra
