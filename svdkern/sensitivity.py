"""Measurements that rank allocation needs before any layer is compressed.

- `output_fisher`: for every compressible linear, Σ over calibration tokens of (∂loss/∂y_i)² per
  output channel i: how much the model's calibration loss reacts to an error in that output
  (the diagonal empirical Fisher). One forward and backward of the whole model per micro-batch;
  only activations get gradients, never weights. Unlike the layer-by-layer passes, it holds
  the whole model and one micro-batch's activation graph on the device (issue 12 streams it).
- `whitened_spectra`: one FP pass, layer by layer, that whitens every group and takes each
  matrix's SVD, keeping only per-component numbers (never the factors), so memory stays that of
  one layer. With Fisher weights, component j of W·P (σ_j, u_j) costs about
  ½·σ_j²·Σ_i f_i u_ij² of calibration loss when dropped: the importance `water_fill` ranks by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .blocks import group_grams, run_layer
from .models import Architecture
from .solvers.factorize import svd_of, target
from .solvers.whiten import whiten


def output_fisher(model, layers, arch: Architecture, windows: torch.Tensor, batch_size: int,
                  device, progress: bool = True) -> dict[str, torch.Tensor]:
    """{"layer.name": (out_features,) float64 Σ_t (∂L/∂y_t)²}, L = mean next-token loss."""
    import torch.nn.functional as F

    fisher, handles = {}, []

    def watch(key):
        def forward_hook(_module, _args, out):
            if out.requires_grad:
                out.register_hook(lambda g: fisher.__setitem__(
                    key, fisher.get(key, 0) + g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0)))
        return forward_hook

    for i, layer in enumerate(layers):
        for name in (n for g in arch.groups for n in g):
            handles.append(layer.get_submodule(name).register_forward_hook(watch(f"{i}.{name}")))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.to(device)
    batches = range(0, len(windows), batch_size)
    try:
        with torch.enable_grad():
            bar = tqdm(total=len(windows), desc="sensitivity", unit="window", disable=not progress)
            for start in batches:
                ids = windows[start:start + batch_size].to(device)
                bar.update(len(ids))
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                (loss * len(ids) / len(windows)).backward()
            bar.close()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return fisher


@dataclass
class Spectrum:
    sigma2: torch.Tensor               # (r,) squared singular values of W·P (P from mean H)
    weighted: torch.Tensor | None      # (r,) σ_j²·Σ_i f_i u_ij², when Fisher weights were given
    tokens: int                        # calibration tokens behind the Gram matrix


@torch.no_grad()
def whitened_spectra(layers, arch: Architecture, hidden: list, kwargs: list, cfg, device, offload,
                     fisher: dict | None, progress: bool = True) -> dict[str, Spectrum]:
    """Per-component numbers of every matrix's whitened SVD on the FP stream (see module doc)."""
    spectra = {}
    for i in tqdm(range(len(layers)), desc="spectra", disable=not progress):
        layer = layers[i].to(device)
        with group_grams(layer, arch, device, f"{i}.") as stats:
            hidden = [run_layer(layer, h.to(device), kw).to(offload) for h, kw in zip(hidden, kwargs[i])]
        for group, st in zip(arch.groups, stats):
            wh = whiten(st.mean(), cfg.whitening, cfg.damp_rel, cfg.max_damp_rel)
            for name in group:
                key = f"{i}.{name}"
                svd = svd_of(target(layer.get_submodule(name).weight.detach(), wh), cfg.svd_dtype)
                sigma2 = svd.S ** 2
                weighted = None
                if fisher is not None:
                    f = fisher[key].to(svd.U.device)
                    weighted = sigma2 * (svd.U ** 2 * f[:, None]).sum(0)
                spectra[key] = Spectrum(sigma2.cpu(), None if weighted is None else weighted.cpu(), st.count)
        layers[i] = layer.to(offload) if offload != device else layer
    return spectra
