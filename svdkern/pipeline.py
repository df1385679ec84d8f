"""The layer-by-layer driver: streams, group order, progress, resume.

The ranks come from a policy (policy.py) decided before the first layer; this driver solves
every matrix at its rank, in the order and on the streams the method asks for.

Memory stays bounded by one decoder layer (plus its original copy for the two-stream methods)
on the compute device and the calibration activations of each stream, kept on `offload`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .blocks import LayerInputs, capture_layer_inputs, group_grams, input_of, propagate, run_layer
from . import distributed
from .checkpoint import Checkpoint, fingerprint
from .clock import StageClock, timed
from .layer_store import LayerStore
from .models import Architecture, architecture_of
from .nn import LowRankLinear, install
from .allocation import uniform_ranks
from .policy import aligned, allocate, matrix_shapes, measure_fisher
from .host import peak_rss, reset_peak_rss
from .presets import CompressionConfig
from .refine import RECIPES, refine_block
from .sensitivity import output_weights
from .solvers.aces import aces_beta, aces_coefficients
from .solvers.factorize import factors_from_svd, svd_of, target, truncation_error, visible_delta
from .solvers.rank import RatioError, check_saves_parameters, residual_rank
from .solvers.select import select_beta
from .solvers.whiten import whiten
from .tune import dense_targets, split_windows, tune_end_to_end
from .staged import LlamaStages, stageable, staged_matches_layer
from .stats import CrossStats, GramStats


@dataclass
class CompressionReport:
    config: dict
    ranks: dict = field(default_factory=dict)        # module name -> total rank
    residual_ranks: dict = field(default_factory=dict)
    betas: dict = field(default_factory=dict)        # module name -> β used (two-stream methods)
    damping: dict = field(default_factory=dict)      # "layer.group" -> relative damping used
    plc: dict | None = None                          # ERC search: candidate k -> error, chosen k
    refine: dict = field(default_factory=dict)       # layer -> block error before/after, steps
    allocation: dict = field(default_factory=dict)   # module name -> rank from the policy (None: dense)
    aligned_ranks: dict = field(default_factory=dict)  # module name -> rank before rank_align moved it
    tune: dict = field(default_factory=dict)           # end-to-end tuning: held-out KL before/after, epochs
    truncation: dict = field(default_factory=dict)     # module name -> tail energy share of its target
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # this process's time per stage (clock.py)
    peak_memory_bytes: int = 0                         # the compute device's (host RSS on the CPU)
    peak_host_bytes: int = 0
    block_params_before: int = 0
    block_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0

    def stages_line(self) -> str:
        """A second line: the seconds per stage, largest first, and the host's peak (on a GPU)."""
        if not self.stage_seconds:
            return ""
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.stage_seconds.items(), key=lambda kv: -kv[1]))
        host = (f"; peak host memory {self.peak_host_bytes / 2**30:.2f} GiB"
                if self.peak_host_bytes and self.peak_host_bytes != self.peak_memory_bytes else "")
        return f"\n  time by stage (this process; a resumed run's earlier parts are not in it): {parts}{host}"

    @property
    def block_ratio(self) -> float:
        return 1 - self.block_params_after / self.block_params_before

    @property
    def model_ratio(self) -> float:
        return 1 - self.model_params_after / self.model_params_before

    def summary(self) -> str:
        gib = self.peak_memory_bytes / 2**30
        return (f"removed {self.model_params_before - self.model_params_after:,} parameters: "
                f"ratio {self.block_ratio:.4f} over the compressed decoder linears, "
                f"{self.model_ratio:.4f} over the whole model; {self.seconds:.1f} s, "
                f"peak memory {gib:.2f} GiB"
                + (f"; {len(self.aligned_ranks)} ranks moved to aligned sizes for the GPU kernels, "
                   "within the budget" if self.aligned_ranks else "") + self.stages_line())


# ----------------------------------------------------------------------------- per-group solve

def compress_group(layer: nn.Module, names, H: torch.Tensor, cfg: CompressionConfig, ranks: dict,
                   report: CompressionReport, prefix: str, delta: torch.Tensor | None = None,
                   held_out=None, first: int = 0, share: bool = True, fisher: dict | None = None) -> list:
    """Replace the linears `names` of `layer` (sharing Gram H, and Δ for two streams).

    ranks: {"layer.name": rank}; a rank of None keeps that matrix dense.
    fisher: {"layer.name": per-output Fisher}, for output-aware whitening (cfg.output_weighting).
    held_out: (H_fit, Δ_fit, H_val, Δ_val) when β is chosen per matrix from `cfg.beta_grid`.
    Under torch.distributed the group's matrices are spread over the ranks (the layer's matrix
    number `first + j` goes to rank (first + j) mod world) and their factors broadcast, at once
    or, with share=False, by the caller (distributed.share_solves) with the (name, owner) pairs returned.
    """
    owners = {n: (first + j) % distributed.world() for j, n in enumerate(names)}
    names = [n for n in names if ranks[prefix + n] is not None]
    if not names:
        return []
    owners = [(n, owners[n]) for n in names]
    mine = [n for n, owner in owners if owner == distributed.rank()]
    wh = whiten(H, cfg.whitening, cfg.damp_rel, cfg.max_damp_rel) if cfg.whitening and mine else None
    if wh is not None:
        report.damping[f"{prefix}{names[0]}"] = wh.damp
    wh_fit = None
    for name in mine:
        linear = layer.get_submodule(name)
        W = linear.weight.detach()
        m, n = W.shape
        rank = ranks[prefix + name]  # aligned for the kernels already (policy.allocate)
        check_saves_parameters(m, n, rank, prefix + name)
        rr = residual_rank(m, n, rank, cfg.residual_beta)
        beta = cfg.beta
        if held_out is not None:
            if wh_fit is None:
                wh_fit = whiten(held_out[0], cfg.whitening, cfg.damp_rel, cfg.max_damp_rel)
            beta, _ = select_beta(W, wh_fit, *held_out[1:], rank, rr, cfg.beta_grid, cfg.svd_dtype)
        scale = output_weights(fisher[prefix + name], cfg.output_weighting) if cfg.output_weighting else None
        if cfg.aces:
            S = target(W, wh, out_scale=scale)
            D = wh.right_inv_t(W.double() @ delta)
            D = D if scale is None else scale.to(D)[:, None] * D
            coef = aces_coefficients(S, D, rank - rr, svd_of(S, cfg.svd_dtype))
            beta = aces_beta(coef, cfg.aces_range)
        if delta is not None:
            report.betas[prefix + name] = beta
        svd = svd_of(target(W, wh, delta, beta, scale), cfg.svd_dtype)
        U, V = factors_from_svd(W, svd, wh, rank, rr, cfg.svd_dtype, scale)
        report.truncation[prefix + name] = truncation_error(svd, rank - rr)
        install(layer, name, U, V, linear)
        report.ranks[prefix + name] = rank
        report.residual_ranks[prefix + name] = rr
    if share:
        distributed.share_solves(layer, prefix, owners, report)
        return []
    return owners


# ----------------------------------------------------------------------------- drivers

def block_linear_params(layers, arch: Architecture) -> int:
    total = 0
    for layer in layers:
        for name in (n for g in arch.groups for n in g):
            total += sum(p.numel() for n_, p in layer.get_submodule(name).named_parameters()
                         if n_ != "bias")
    return total


def compress_model(model, windows: torch.Tensor, cfg: CompressionConfig, *, device=None,
                   offload=None, batch_size: int = 8, checkpoint_dir: str | None = None,
                   progress: bool = True, log=print, store: LayerStore | None = None) -> CompressionReport:
    """Compress `model` in place on calibration `windows` (nsamples × seqlen token ids).

    store: where the layers wait for their turn (layer_store.py); default the model itself.
    """
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    offload = torch.device(offload) if offload is not None else torch.device("cpu")
    store = store if store is not None else LayerStore(layers, device, offload)
    if cfg.tune_epochs and store.writes_factors:
        raise ValueError("end-to-end tuning trains the whole model at once: it cannot stream layers from "
                         "disk. Drop --stream-from-disk (the compressed model must fit in memory) or set "
                         "--tune-epochs 0")
    if cfg.tune_epochs:
        split_windows(len(windows), cfg.tune_holdout)  # too few windows: refused now, not after the solve
    report = CompressionReport(config=cfg.to_dict())
    report.block_params_before = block_linear_params(layers, arch)
    report.model_params_before = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model.eval()
    clock, clock_started = StageClock(device), time.perf_counter()
    reset_peak_rss()  # the host's peak from here on, not the model's loading
    with torch.no_grad(), clock.activate():
        if cfg.whitening is None:
            shapes = matrix_shapes(layers, arch)
            ranks, details = aligned(shapes, uniform_ranks(shapes, cfg.ratio), {}, cfg)
            report.aligned_ranks = details["aligned_from"]
            _plain_svd(store, arch, cfg, report, ranks, progress)
        else:
            _check_calibration_size(windows, layers[0], arch)
            calibration = windows  # all ranks' (the sensitivity pass takes its sample from it)
            if distributed.world() > 1:  # this rank's share of the micro-batches (distributed.py)
                windows = distributed.local_windows(windows, batch_size)
                progress = progress and distributed.rank() == 0
            ckpt = (Checkpoint(checkpoint_dir, fingerprint(model, store, calibration, cfg, batch_size), started,
                               device) if checkpoint_dir else None)
            with timed("checkpoint I/O"):
                saved = ckpt.load_allocation() if ckpt is not None else None  # refuses other settings
            with timed("capture"):
                inputs = capture_layer_inputs(model, layers, windows, batch_size, device, offload)
            try:
                fisher = (_fisher(model, store, arch, calibration, cfg, batch_size, device, offload, ckpt, progress)
                          if cfg.needs_fisher and (saved is None or cfg.output_weighting) else None)
                if saved is None:
                    with timed("allocation"):
                        ranks, details = allocate(store, arch, inputs, cfg, device, offload, progress, log, fisher,
                                                  ckpt)
                    if ckpt is not None:  # a resumed run keeps these ranks, whatever a re-measurement says
                        with timed("checkpoint I/O"):
                            ckpt.save_allocation(ranks, details)
                else:
                    ranks, details = saved
            except KeyboardInterrupt:
                if ckpt is not None and distributed.rank() == 0:
                    log(f"\ninterrupted before any layer was compressed: {ckpt.kept_before_layers()}")
                raise
            report.allocation = ranks
            report.aligned_ranks = dict(details.get("aligned_from", {}))
            details = {k: v for k, v in details.items() if k != "aligned_from"}
            if cfg.layer_policy == "plc":
                report.plc = details
            targets = (_tuning_targets(model, store, inputs, calibration, cfg, batch_size, device, offload, ckpt,
                                       progress) if cfg.tune_epochs else None)
            _sequential(store, arch, cfg, report, inputs, ranks, device, offload, progress, ckpt, log,
                        fisher if cfg.output_weighting else None)
            if cfg.tune_epochs:
                del inputs  # the layer-wise streams are done with; tuning runs whole windows
                _tune(model, calibration, targets, cfg, batch_size, device, ckpt, report, progress, log)
            if ckpt is not None:
                with timed("checkpoint I/O"):
                    ckpt.remove()
                started -= ckpt.previous_seconds  # a resumed run reports the time of all its parts
    report.seconds = time.perf_counter() - started
    this_run = time.perf_counter() - clock_started
    report.stage_seconds = {**clock.seconds,
                            "forward and the rest": max(this_run - sum(clock.seconds.values()), 0.0)}
    report.peak_host_bytes = peak_rss()
    report.peak_memory_bytes = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                else report.peak_host_bytes)
    report.block_params_after = block_linear_params(layers, arch)
    report.model_params_after = sum(p.numel() for p in model.parameters())
    model._svdkern_report = report
    return report


def _fisher(model, store, arch, windows, cfg, batch_size, device, offload, ckpt, progress) -> dict:
    """The outputs' Fisher sensitivity, measured once: an interrupted run reads it back."""
    with timed("checkpoint I/O"):
        fisher = ckpt.load_fisher() if ckpt is not None else None
    if fisher is None:
        with timed("allocation"):
            fisher = measure_fisher(model, store, arch, windows, cfg, batch_size, device, offload, progress)
        if ckpt is not None:
            with timed("checkpoint I/O"):
                ckpt.save_fisher(fisher)
    return fisher


def _tuning_targets(model, store, inputs, windows, cfg, batch_size, device, offload, ckpt, progress):
    """The dense model's next-token targets for end-to-end tuning: computed before any layer is
    compressed (or read back from the checkpoint of an interrupted run)."""
    with timed("checkpoint I/O"):
        targets = ckpt.load_targets() if ckpt is not None else None
    if targets is None:
        with timed("tuning"):
            targets = dense_targets(model, store, inputs, windows, cfg.tune_topk, batch_size, device, offload,
                                    progress)
        if ckpt is not None:
            with timed("checkpoint I/O"):
                ckpt.save_targets(targets)
    return targets


def _tune(model, windows, targets, cfg, batch_size, device, ckpt, report, progress, log):
    with timed("checkpoint I/O"):
        saved = ckpt.load_tuning() if ckpt is not None else None
    if saved is not None and distributed.rank() == 0:
        log(f"resuming end-to-end tuning after epoch {saved['epoch']} of {cfg.tune_epochs}")
    model.to(device)  # the compressed model, whole, on the compute device
    with timed("tuning"), torch.enable_grad():
        result = tune_end_to_end(model, windows, targets, cfg, batch_size, device, saved,
                                 ckpt.save_tuning if ckpt is not None else None, progress, log)
    report.tune = {"held_out_kl_before": result.before, "held_out_kl_after": result.after,
                   "kept_epoch": result.kept_epoch, "history": result.history, "steps": result.steps,
                   "trained_parameters": result.trained}


def _check_calibration_size(windows, layer0, arch):
    widest = max(layer0.get_submodule(g[0]).in_features for g in arch.groups)
    if windows.numel() < widest:
        raise RatioError(
            f"calibration has {windows.numel()} tokens, fewer than the widest layer input "
            f"({widest}): its Gram matrix would be singular. Raise nsamples or seqlen.")


def _plain_svd(store: LayerStore, arch, cfg, report, ranks, progress):
    for i in tqdm(range(len(store)), desc="svd", unit="layer", disable=not progress):
        layer = store.fetch(i)
        for group in arch.groups:
            for name in group:
                linear = layer.get_submodule(name)
                rank = ranks[f"{i}.{name}"]
                with timed("solves"):
                    svd = svd_of(target(linear.weight, None), cfg.svd_dtype)
                    report.truncation[f"{i}.{name}"] = truncation_error(svd, rank)
                    install(layer, name, *factors_from_svd(linear.weight, svd, None, rank), linear)
                report.ranks[f"{i}.{name}"] = rank
        store.commit(i, layer)


def _sequential(store: LayerStore, arch, cfg, report, inputs: LayerInputs, ranks, device, offload, progress,
                ckpt, log, fisher: dict | None = None):
    streams = {"fp": inputs.hidden} if cfg.stream == "fp" else {"compressed": list(inputs.hidden)}
    if cfg.stream == "both":
        streams["fp"] = inputs.hidden
    start = 0
    if ckpt is not None:
        with timed("checkpoint I/O"):
            start, saved = ckpt.load(store, arch, report)
        if saved is not None:
            streams = saved
            if distributed.rank() == 0:
                log(f"resuming from {ckpt.dir} at layer {start}")
    bar = tqdm(range(start, len(store)), desc=f"compress {cfg.stream}", unit="layer",
               initial=start, total=len(store), disable=not progress)
    staging = None  # decided on the first layer: does the staged executor reproduce it?
    global_batches = distributed.summed_count(len(inputs.hidden), device)  # all ranks' micro-batches
    for i in bar:
        layer = store.fetch(i)
        kwargs = inputs.kwargs[i]
        prefix = f"{i}."
        try:
            if cfg.stream == "fp":
                fp_in = streams["fp"]
                with group_grams(layer, arch, device, prefix) as stats:
                    streams["fp"] = propagate(layer, streams["fp"], kwargs, device, offload)
                solved_elsewhere, first = [], 0  # independent groups: share their factors once
                for group, st in zip(arch.groups, stats):
                    with timed("solves"):
                        solved_elsewhere += compress_group(layer, group, st.mean(), cfg, ranks, report, prefix,
                                                           first=first, share=False, fisher=fisher)
                    first += len(group)
                with timed("solves"):
                    distributed.share_solves(layer, prefix, solved_elsewhere, report)
                if cfg.refine_epochs:
                    _refine(layer, fp_in, streams["fp"], kwargs, cfg, report, i, device)
            else:
                fp_inputs = None
                if cfg.stream == "both":
                    original = copy.deepcopy(layer)
                    fp_inputs, streams["fp"] = _fp_group_inputs(original, arch, streams["fp"], kwargs,
                                                                device, offload, cfg.fp_cache_bytes)
                if staging is None:
                    staging = _can_stage(layer, arch, streams["compressed"], kwargs, device, cfg)
                # refinement changes the factors after the last group: it needs a plain propagation
                stages = (LlamaStages(layer, streams["compressed"], kwargs, device, offload)
                          if staging and not cfg.refine_epochs else None)
                for g, group in enumerate(arch.groups):
                    if all(ranks[prefix + n] is None for n in group):
                        continue
                    if stages is not None:
                        x_hat = lambda b, g=g: stages.group_input(g, b)  # noqa: E731
                    else:
                        x_hat = lambda b, lead=group[0]: input_of(  # noqa: E731
                            layer, lead, streams["compressed"][b].to(device), kwargs[b])
                    holdout = _holdout(cfg, global_batches) if cfg.beta_grid else 0
                    if cfg.gram_stream == "fp":  # the original model's activations whiten (AA-SVD's obj2)
                        x_hat, fp_stats = (lambda b, g=g: fp_inputs.get(g, b).to(device)), None
                    else:
                        fp_stats = fp_inputs
                    H, delta, held_out = _group_stats(layer.get_submodule(group[0]).in_features, fp_stats, g,
                                                      x_hat, len(kwargs), device, prefix + group[0], holdout,
                                                      global_batches, cfg.delta_damp_rel)
                    with timed("solves"):
                        compress_group(layer, group, H, cfg, ranks, report, prefix, delta, held_out,
                                       first=sum(len(x) for x in arch.groups[:g]), fisher=fisher)
                if cfg.refine_epochs:
                    _refine(layer, streams["compressed"], streams["fp"], kwargs, cfg, report, i, device)
                streams["compressed"] = (stages.outputs() if stages is not None else
                                         propagate(layer, streams["compressed"], kwargs, device, offload))
            store.commit(i, layer)
            if ckpt is not None:
                with timed("checkpoint I/O"):
                    ckpt.save(i, layer, arch, streams, report, factors=not store.writes_factors,
                              whole_layer=bool(cfg.refine_epochs) and RECIPES[cfg.refine_recipe].train_all)
        except KeyboardInterrupt:
            if ckpt is not None and distributed.rank() == 0:
                log(f"\ninterrupted: layers 0..{i - 1} are saved in {ckpt.dir}; rerun the same "
                    "command to resume")
            raise


def _holdout(cfg, batches: int) -> int:
    if cfg.holdout_batches >= batches:
        raise ValueError(
            f"holdout_batches={cfg.holdout_batches} leaves none of the {batches} calibration "
            "micro-batches to fit: lower it, raise nsamples, or lower the batch size")
    return cfg.holdout_batches


def _refine(layer, inputs, targets, kwargs, cfg, report, index, device):
    with timed("refinement"):
        if not any(isinstance(m, LowRankLinear) for m in layer.modules()):
            report.refine[index] = {"skipped": "the policy kept every matrix of this layer dense"}
            return
        total = distributed.summed_count(len(inputs), device)  # all ranks' micro-batches
        holdout = min(cfg.holdout_batches, total - 1)  # one batch: it fits and selects
        recipe = RECIPES[cfg.refine_recipe]
        accumulate = 1
        if recipe.step_windows:  # micro-batches per step, from all ranks' windows per micro-batch
            windows = distributed.summed_count(sum(x.shape[0] for x in inputs), device)
            accumulate = max(1, round(recipe.step_windows * total / windows))
        result = refine_block(layer, run_layer, inputs, targets, kwargs, epochs=cfg.refine_epochs,
                              lr=cfg.refine_lr, holdout=holdout, device=device, global_batches=total,
                              recipe=recipe, accumulate=accumulate)
        report.refine[index] = {"before": result.before, "after": result.after, "steps": result.steps,
                                "selection": result.selection}


class _Recompute:
    """FP group inputs recomputed on demand (early-exit passes) when caching would not fit."""

    def __init__(self, original, arch, hidden, kwargs, device):
        self.original, self.arch, self.hidden, self.kwargs, self.device = original, arch, hidden, kwargs, device

    def get(self, group: int, batch: int):
        lead = self.arch.groups[group][0]
        return input_of(self.original, lead, self.hidden[batch].to(self.device), self.kwargs[batch])


class _Cached:
    def __init__(self, inputs):
        self.inputs = inputs

    def get(self, group: int, batch: int):
        return self.inputs[group][batch]


def _fp_group_inputs(original, arch, hidden, kwargs, device, offload, budget_bytes):
    """(source of the FP stream's group inputs, the FP stream after this layer).

    One pass of the original layer both propagates the FP stream and, when the inputs of all
    groups fit in `budget_bytes`, records them, so no FP pass is repeated per group.
    """
    tokens = sum(h.shape[:-1].numel() for h in hidden)
    width = sum(original.get_submodule(g[0]).in_features for g in arch.groups)
    if tokens * width * 4 > budget_bytes:
        return _Recompute(original, arch, hidden, kwargs, device), propagate(original, hidden, kwargs, device, offload)
    inputs = [[] for _ in arch.groups]
    handles = [original.get_submodule(g[0]).register_forward_pre_hook(
        lambda _m, args, store=inputs[i]: store.append(args[0].detach().float().to(offload)))
        for i, g in enumerate(arch.groups)]
    try:
        out = propagate(original, hidden, kwargs, device, offload)
    finally:
        for h in handles:
            h.remove()
    return _Cached(inputs), out


def _group_stats(n: int, fp_inputs, g: int, x_hat_of, batches: int, device, name: str, holdout: int = 0,
                 global_batches: int | None = None, delta_damp_rel: float = 0.0):
    """Ĥ and Δ (Δ against the FP stream's inputs, for two streams) for group g.

    x_hat_of(b): the compressed stream's input of the group for micro-batch b (n channels).
    Returns (H, Δ, held_out): held_out is None, or (H_fit, Δ_fit, H_val, Δ_val) split at the last
    `holdout` micro-batches (of all ranks' `global_batches`, under torch.distributed), for choosing β
    per matrix. Each Δ is filtered by its H (factorize.visible_delta) when delta_damp_rel > 0.
    """
    def visible(delta, H):
        return visible_delta(delta, H, delta_damp_rel) if delta_damp_rel else delta

    parts = 2 if holdout and fp_inputs is not None else 1  # split only when β is chosen
    split = (global_batches or batches) - holdout
    grams = [GramStats(n, device, name=name) for _ in range(parts)]
    crosses = [CrossStats(n, device, name=name) for _ in range(parts)] if fp_inputs is not None else None
    for b in range(batches):
        part = int(distributed.global_batch(b) >= split) if parts == 2 else 0
        x_hat = x_hat_of(b)
        grams[part].add(x_hat)
        if crosses is not None:
            crosses[part].add(fp_inputs.get(g, b).to(device), x_hat)
    if parts == 1:
        H = grams[0].mean()
        return H, (visible(crosses[0].mean(), H) if crosses is not None else None), None
    H_fit, H_val = grams[0].mean(), grams[1].mean()
    held_out = (H_fit, visible(crosses[0].mean(), H_fit), H_val, visible(crosses[1].mean(), H_val))
    H = grams[0].merged(grams[1]).mean()
    return H, visible(crosses[0].merged(crosses[1]).mean(), H), held_out


def _can_stage(layer, arch, hidden, kwargs, device, cfg) -> bool:
    """Stage this run's layers when the layer has the Llama shape, reproduces its own forward,
    and the down_proj inputs of all micro-batches fit the cache budget."""
    tokens = sum(h.shape[:-1].numel() for h in hidden)
    ok = (stageable(layer, arch.groups)
          and tokens * layer.get_submodule("mlp.down_proj").in_features * 4 <= cfg.fp_cache_bytes
          and staged_matches_layer(layer, hidden, kwargs, device))
    return distributed.all_agree(ok, device)  # every rank, every outcome: one collective
