"""Layer/rank policies: which rank each matrix gets, decided before any layer is compressed.

A policy returns {"layer.name": rank, or None to keep the matrix dense}; the driver then solves
every matrix at its rank with whatever stream, β and residual stage the config asks for, so
every policy composes with every method. All policies decide on calibration data only.

- uniform: every matrix at the ratio.
- plc: ERC's partial-layer compression (last k layers at N·R/k, k searched on the final-layer
  error of the FP model, METHODS.md §6.2).
- v2: SVD-LLM V2's 1/log(truncation loss) rule per matrix type (METHODS.md §3.2).
- sensitivity: water-filling of whitened spectra weighted by each output's Fisher sensitivity
  (calibration loss), so the budget goes where the model's end-to-end loss needs it.
"""
from __future__ import annotations

import copy
import math

from tqdm.auto import tqdm

from . import distributed
from .allocation import (MatrixShape, align_within_budget, budget_of, fit_budget, uniform_ranks, v2_ranks,
                         water_fill)
from .blocks import group_grams, propagate
from .nn import install
from .sensitivity import output_fisher, whitened_spectra
from .solvers.factorize import factors_from_svd, svd_of, target
from .solvers.rank import plc_candidates, plc_layer_ratio, rank_for_ratio, residual_rank
from .solvers.whiten import whiten


def matrix_shapes(layers, arch) -> list[MatrixShape]:
    shapes = []
    for i, layer in enumerate(layers):
        for name in (n for g in arch.groups for n in g):
            linear = layer.get_submodule(name)
            shapes.append(MatrixShape(f"{i}.{name}", linear.out_features, linear.in_features))
    return shapes


def measure_fisher(model, store, arch, windows, cfg, batch_size, device, offload, progress) -> dict:
    """The outputs' Fisher sensitivity (sensitivity.output_fisher) on the first
    `cfg.sensitivity_samples` of `windows` (all ranks' windows under torch.distributed)."""
    sample = windows[: cfg.sensitivity_samples] if cfg.sensitivity_samples else windows
    return output_fisher(model, store, arch, distributed.local_windows(sample, batch_size, allow_none=True),
                         batch_size, device, offload, progress, total=len(sample))


def allocate(store, arch, inputs, cfg, device, offload, progress, log,
             fisher: dict | None = None, ckpt=None) -> tuple[dict, dict]:
    """(ranks, details for the report) under `cfg.layer_policy` at `cfg.ratio`, aligned to
    `cfg.rank_align` within the same budget (details["aligned_from"]: the ranks before); `store`
    holds the layers (layer_store.py); `fisher` (measure_fisher) is needed by the sensitivity policy;
    `ckpt` (checkpoint.Checkpoint) keeps the spectra pass's progress."""
    shapes = matrix_shapes(store.layers, arch)
    if cfg.layer_policy == "uniform":
        ranks, details, importance = uniform_ranks(shapes, cfg.ratio), {}, None
    elif cfg.layer_policy == "plc":
        (ranks, details), importance = plc_search(store, arch, cfg, inputs, device, offload, progress, log), None
    else:
        ranks, details, importance = _spectral(store, arch, shapes, inputs, cfg, device, offload, progress, log,
                                               fisher, ckpt)
    return aligned(shapes, ranks, details, cfg, importance)


def aligned(shapes, ranks, details, cfg, importance=None) -> tuple[dict, dict]:
    """The policy's ranks aligned for the GPU kernels, with what alignment frees given back."""
    ranks, before = align_within_budget(shapes, ranks, cfg.rank_align, budget_of(shapes, cfg.ratio), importance)
    return ranks, {**details, "aligned_from": before}


def _spectral(store, arch, shapes, inputs, cfg, device, offload, progress, log, fisher, ckpt):
    """The policies that read whitened spectra: v2 and sensitivity; (ranks, details, importance)."""
    if cfg.layer_policy == "sensitivity" and fisher is None:
        raise ValueError("the sensitivity policy ranks by measured Fisher sensitivity: pass measure_fisher's result")
    spectra = whitened_spectra(store, arch, inputs.hidden, inputs.kwargs, cfg, device, offload,
                               fisher if cfg.layer_policy == "sensitivity" else None, progress, ckpt)
    if cfg.layer_policy == "v2":
        return v2_ranks(shapes, cfg.ratio, v2_losses(shapes, spectra, cfg.ratio)), {}, None
    floor = {s.name: max(1, math.floor(cfg.min_rank_fraction * rank_for_ratio(s.m, s.n, cfg.ratio)))
             for s in shapes}
    importance = {k: v.weighted for k, v in spectra.items()}
    ranks = water_fill(shapes, budget_of(shapes, cfg.ratio), importance, floor)
    dense = sum(r is None for r in ranks.values())
    log(f"sensitivity allocation: {len(ranks) - dense} low-rank matrices, {dense} kept dense")
    return ranks, {}, importance


def v2_losses(shapes, spectra, ratio) -> dict[str, float]:
    """SVD-LLM V2's truncation loss of each matrix at its uniform rank r, on the raw sums:
    ‖(W − W_r)X‖_F = √(tokens · Σ_{i≥r} σ_i²), σ the singular values of W whitened by the mean Gram."""
    uniform = uniform_ranks(shapes, ratio)
    return {s.name: math.sqrt(spectra[s.name].tokens * float(spectra[s.name].sigma2[uniform[s.name]:].sum()))
            for s in shapes}


def plc_search(store, arch, cfg, inputs, device, offload, progress, log) -> tuple[dict, dict]:
    """ERC's PLC: choose k by the final-layer error on the FP model (first N−k layers dense).

    One pass over the layers carries the FP stream and one stream per candidate k (started at
    layer N−k from the FP stream); each layer's statistics and stage-1 SVDs are computed once,
    used by every candidate, and freed before the next layer, so memory stays at one layer's
    statistics plus the activations, like the other methods.
    """
    layers = store.layers
    N = len(layers)
    candidates = plc_candidates(N, cfg.ratio, cfg.plc_step, cfg.residual_beta)
    first_needed = N - max(candidates)
    nb = len(inputs.hidden)  # this rank's micro-batches; the search takes the first of all ranks'
    wanted = None if cfg.plc_samples is None else max(1, -(-cfg.plc_samples // inputs.hidden[0].shape[0]))
    search_batches = nb if wanted is None else distributed.local_count(wanted, nb)
    fp, trials = inputs.hidden, {}
    for i in tqdm(range(N), desc="plc search", unit="layer", disable=not progress):
        layer = store.fetch(i)
        kwargs = inputs.kwargs[i]
        trials.update({k: fp[:search_batches] for k in candidates if N - k == i})
        if i < first_needed:
            fp = propagate(layer, fp, kwargs, device, offload)
        else:
            with group_grams(layer, arch, device, f"{i}.") as stats:
                fp = propagate(layer, fp, kwargs, device, offload)
            solved = {}  # stage-1 SVDs do not depend on k: once per matrix, re-truncated per candidate
            for group, st in zip(arch.groups, stats):
                wh = whiten(st.mean(), cfg.whitening, cfg.damp_rel, cfg.max_damp_rel)
                for name in group:
                    solved[name] = (wh, svd_of(target(layer.get_submodule(name).weight.detach(), wh), cfg.svd_dtype))
            del stats
            for k, hidden in trials.items():
                trial = _plc_trial_layer(layer, arch, solved, plc_layer_ratio(N, cfg.ratio, k), cfg, i)
                trials[k] = propagate(trial, hidden, kwargs[:search_batches], device, offload)
                del trial
            del solved
        store.put_back(i, layer)
    fp_out = fp[:search_batches]
    den = distributed.summed_float(sum(float((f.double() ** 2).sum()) for f in fp_out), device)
    errors = {}
    for k in candidates:
        num = sum(float(((h.double() - f.double()) ** 2).sum()) for h, f in zip(trials[k], fp_out))
        errors[k] = (distributed.summed_float(num, device) / den) ** 0.5
        log(f"plc: last {k:3d} layers at ratio {plc_layer_ratio(N, cfg.ratio, k):.4f}: "
            f"final-layer relative error {errors[k]:.5f}")
    best = min(errors, key=errors.get)
    layer_ratio = plc_layer_ratio(N, cfg.ratio, best)
    log(f"plc: compressing the last {best} of {N} layers at ratio {layer_ratio:.4f}")
    shapes = matrix_shapes(layers, arch)
    ranks = {}
    for s in shapes:
        i = int(s.name.split(".", 1)[0])
        ranks[s.name] = rank_for_ratio(s.m, s.n, layer_ratio, s.name) if i >= N - best else None
    # N·R/k's floors can keep a little more than the uniform floors: trim to the budget
    ranks = fit_budget(shapes, ranks, budget_of(shapes, cfg.ratio))
    return ranks, {"errors": errors, "layers": best, "layer_ratio": layer_ratio,
                   "search_windows": distributed.summed_count(sum(h.shape[0] for h in fp_out), device)}


def _plc_trial_layer(layer, arch, solved, layer_ratio, cfg, index):
    """A copy of `layer` with every matrix REC-compressed at `layer_ratio` from its stage-1 SVD."""
    trial = copy.deepcopy(layer)
    for name in (n for g in arch.groups for n in g):
        linear = trial.get_submodule(name)
        m, n = linear.weight.shape
        rank = rank_for_ratio(m, n, layer_ratio, f"layer {index} {name}")
        wh, svd = solved[name]
        U, V = factors_from_svd(linear.weight.detach(), svd, wh, rank,
                                residual_rank(m, n, rank, cfg.residual_beta), cfg.svd_dtype)
        install(trial, name, U, V, linear)
    return trial
