"""The layer-by-layer driver: streams, group order, PLC search, progress, resume.

Memory stays bounded by one decoder layer (plus its original copy for the two-stream methods)
on the compute device and the calibration activations of each stream, kept on `offload`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .models import Architecture, architecture_of, set_submodule
from .nn import LowRankLinear
from .presets import CompressionConfig
from .solvers.aces import aces_beta, aces_coefficients
from .solvers.factorize import factors_from_svd, svd_of, target
from .solvers.rank import (RatioError, plc_candidates, plc_layer_ratio, rank_for_ratio,
                           residual_rank)
from .solvers.whiten import whiten
from .stats import CrossStats, GramStats


class StopForward(Exception):
    """Raised by a capture hook to end a forward once the wanted input is seen."""


@dataclass
class CompressionReport:
    config: dict
    ranks: dict = field(default_factory=dict)        # module name -> total rank
    residual_ranks: dict = field(default_factory=dict)
    betas: dict = field(default_factory=dict)        # module name -> β used (two-stream methods)
    damping: dict = field(default_factory=dict)      # "layer.group" -> relative damping used
    plc: dict | None = None                          # ERC search: candidate k -> error, chosen k
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    block_params_before: int = 0
    block_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0

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
                f"peak memory {gib:.2f} GiB")


# ----------------------------------------------------------------------------- forward helpers

def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def capture_input(module: nn.Module, stop: bool = True):
    """Record the input of `module` in box['x'] and (by default) end the forward there."""
    box = {}

    def hook(_mod, args):
        box["x"] = args[0].detach()
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def input_of(layer: nn.Module, name: str, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input that linear `name` sees when `layer` runs on `hidden` (forward stops there)."""
    with capture_input(layer.get_submodule(name)) as box:
        try:
            run_layer(layer, hidden, kwargs)
        except StopForward:
            pass
    return box["x"]


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its input and kwargs, passes hidden through."""

    def __init__(self, kwargs_store: list, hidden_store: list | None, last: bool):
        super().__init__()
        self.kwargs_store, self.hidden_store, self.last = kwargs_store, hidden_store, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers called with positional extras are not supported")
        self.kwargs_store.append(kwargs)
        if self.hidden_store is not None:
            self.hidden_store.append(hidden_states.detach())
        if self.last:
            raise StopForward
        return hidden_states


@dataclass
class LayerInputs:
    hidden: list           # first layer's input, one tensor per micro-batch
    kwargs: list           # kwargs[layer][batch]: masks, position embeddings, ...


def capture_layer_inputs(model, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                         device, offload) -> LayerInputs:
    """Inputs of layer 0 and every layer's call kwargs, from one pass that skips all layers."""
    originals = list(layers)
    kwargs = [[] for _ in originals]
    hidden = []
    for i in range(len(originals)):
        layers[i] = _Recorder(kwargs[i], hidden if i == 0 else None, i == len(originals) - 1)
    try:
        model.to(device)  # moves embeddings/norms only: the layers are recorders now
        for start in range(0, len(windows), batch_size):
            try:
                model.base_model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs([h.to(offload) for h in hidden], kwargs)


# ----------------------------------------------------------------------------- per-group solve

def compress_group(layer: nn.Module, names, H: torch.Tensor, cfg: CompressionConfig, ratio: float,
                   report: CompressionReport, prefix: str, delta: torch.Tensor | None = None):
    """Replace the linears `names` of `layer` (sharing Gram H, and Δ for two streams)."""
    wh = whiten(H, cfg.whitening, cfg.damp_rel, cfg.max_damp_rel) if cfg.whitening else None
    if wh is not None:
        report.damping[f"{prefix}{names[0]}"] = wh.damp
    for name in names:
        linear = layer.get_submodule(name)
        W = linear.weight.detach()
        m, n = W.shape
        rank = rank_for_ratio(m, n, ratio, prefix + name)
        rr = residual_rank(m, n, rank, cfg.residual_beta)
        beta = cfg.beta
        if cfg.aces:
            S = target(W, wh)
            D = wh.right_inv_t(W.double() @ delta)
            coef = aces_coefficients(S, D, rank - rr, svd_of(S, cfg.svd_dtype))
            beta = aces_beta(coef, cfg.aces_range)
        if delta is not None:
            report.betas[prefix + name] = beta
        svd = svd_of(target(W, wh, delta, beta), cfg.svd_dtype)
        U, V = factors_from_svd(W, svd, wh, rank, rr, cfg.svd_dtype)
        install(layer, name, U, V, linear)
        report.ranks[prefix + name] = rank
        report.residual_ranks[prefix + name] = rr


def install(layer: nn.Module, name: str, U, V, linear: nn.Linear) -> None:
    bias = linear.bias.detach() if linear.bias is not None else None
    new = LowRankLinear.from_factors(U.to(linear.weight.dtype), V.to(linear.weight.dtype), bias,
                                     dtype=linear.weight.dtype)
    set_submodule(layer, name, new)


@contextmanager
def group_grams(layer, arch: Architecture, device, prefix):
    """Accumulate one Gram per input group while `layer` runs inside the block."""
    stats, handles = [], []
    for group in arch.groups:
        lead = layer.get_submodule(group[0])
        st = GramStats(lead.in_features, device, name=prefix + group[0])
        handles.append(lead.register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0])))
        stats.append(st)
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _propagate(layer, hidden: list, kwargs: list, device, offload) -> list:
    return [run_layer(layer, h.to(device), kw).to(offload) for h, kw in zip(hidden, kwargs)]


# ----------------------------------------------------------------------------- checkpoints

class Checkpoint:
    """Per-layer factors and the current stream activations, so an interrupted run resumes."""

    def __init__(self, directory: str, fingerprint: str):
        self.dir, self.fingerprint = directory, fingerprint
        os.makedirs(directory, exist_ok=True)
        self.progress_file = os.path.join(directory, "progress.json")

    def load(self, layers, arch: Architecture):
        """(next layer, streams) from a previous run, or (0, None)."""
        if not os.path.exists(self.progress_file):
            return 0, None
        with open(self.progress_file) as f:
            progress = json.load(f)
        if progress["fingerprint"] != self.fingerprint:
            raise RuntimeError(
                f"checkpoint directory {self.dir} belongs to a run with other settings or data; "
                "delete it (or pass another checkpoint directory) to start afresh")
        from safetensors.torch import load_file

        for i in range(progress["next_layer"]):
            tensors = load_file(os.path.join(self.dir, f"layer_{i:04d}.safetensors"))
            for name in (n for g in arch.groups for n in g):
                linear = layers[i].get_submodule(name)
                install(layers[i], name, tensors[name + ".U"], tensors[name + ".V"], linear)
        streams = torch.load(os.path.join(self.dir, "streams.pt"), weights_only=True)
        return progress["next_layer"], streams

    def remove(self) -> None:
        """Delete what this run wrote (never anything else in the directory)."""
        for name in os.listdir(self.dir):
            if name.startswith("layer_") or name in ("streams.pt", "progress.json"):
                os.remove(os.path.join(self.dir, name))
        if not os.listdir(self.dir):
            os.rmdir(self.dir)

    def save(self, index: int, layer, arch: Architecture, streams: dict) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name in (n for g in arch.groups for n in g):
            module = layer.get_submodule(name)
            tensors[name + ".U"] = module.U.detach().contiguous().cpu()
            tensors[name + ".V"] = module.V.detach().contiguous().cpu()
        _atomic(lambda p: save_file(tensors, p), os.path.join(self.dir, f"layer_{index:04d}.safetensors"))
        _atomic(lambda p: torch.save({k: [t.cpu() for t in v] for k, v in streams.items()}, p),
                os.path.join(self.dir, "streams.pt"))
        _atomic(lambda p: json.dump({"next_layer": index + 1, "fingerprint": self.fingerprint},
                                    open(p, "w")), self.progress_file)


def _atomic(write, path: str) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _fingerprint(model, windows: torch.Tensor, cfg: CompressionConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()


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
                   progress: bool = True, log=print) -> CompressionReport:
    """Compress `model` in place on calibration `windows` (nsamples × seqlen token ids)."""
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    offload = torch.device(offload) if offload is not None else torch.device("cpu")
    report = CompressionReport(config=cfg.to_dict())
    report.block_params_before = block_linear_params(layers, arch)
    report.model_params_before = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        if cfg.whitening is None:
            _plain_svd(layers, arch, cfg, report, device, progress)
        else:
            _check_calibration_size(windows, layers[0], arch)
            inputs = capture_layer_inputs(model, layers, windows, batch_size, device, offload)
            if cfg.layer_policy == "plc":
                _plc(layers, arch, cfg, report, inputs, device, offload, progress, log)
            else:
                ckpt = Checkpoint(checkpoint_dir, _fingerprint(model, windows, cfg)) if checkpoint_dir else None
                _uniform(layers, arch, cfg, report, inputs, device, offload, progress, ckpt, log)
                if ckpt is not None:
                    ckpt.remove()
    report.seconds = time.perf_counter() - started
    report.peak_memory_bytes = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    report.block_params_after = block_linear_params(layers, arch)
    report.model_params_after = sum(p.numel() for p in model.parameters())
    model._svdkern_report = report
    return report


def _check_calibration_size(windows, layer0, arch):
    widest = max(layer0.get_submodule(g[0]).in_features for g in arch.groups)
    if windows.numel() < widest:
        raise RatioError(
            f"calibration has {windows.numel()} tokens, fewer than the widest layer input "
            f"({widest}): its Gram matrix would be singular. Raise nsamples or seqlen.")


def _plain_svd(layers, arch, cfg, report, device, progress):
    for i, layer in enumerate(tqdm(layers, desc="svd", disable=not progress)):
        layer.to(device)
        for group in arch.groups:
            for name in group:
                linear = layer.get_submodule(name)
                m, n = linear.weight.shape
                rank = rank_for_ratio(m, n, cfg.ratio, f"layer {i} {name}")
                svd = svd_of(target(linear.weight, None), cfg.svd_dtype)
                install(layer, name, *factors_from_svd(linear.weight, svd, None, rank), linear)
                report.ranks[f"{i}.{name}"] = rank


def _uniform(layers, arch, cfg, report, inputs: LayerInputs, device, offload, progress, ckpt, log):
    streams = {"fp": inputs.hidden}
    if cfg.stream != "fp":
        streams["compressed"] = list(inputs.hidden)
    start = 0
    if ckpt is not None:
        start, saved = ckpt.load(layers, arch)
        if saved is not None:
            streams = saved
            log(f"resuming from {ckpt.dir} at layer {start}")
    bar = tqdm(range(start, len(layers)), desc=f"compress {cfg.stream}", disable=not progress)
    for i in bar:
        layer = layers[i].to(device)
        kwargs = inputs.kwargs[i]
        prefix = f"{i}."
        try:
            if cfg.stream == "fp":
                with group_grams(layer, arch, device, prefix) as stats:
                    streams["fp"] = _propagate(layer, streams["fp"], kwargs, device, offload)
                for group, st in zip(arch.groups, stats):
                    compress_group(layer, group, st.mean(), cfg, cfg.ratio, report, prefix)
            else:
                fp_inputs = None
                if cfg.stream == "both":
                    original = copy.deepcopy(layer)
                    fp_inputs, streams["fp"] = _fp_group_inputs(original, arch, streams["fp"], kwargs,
                                                                device, offload, cfg.fp_cache_bytes)
                for g, group in enumerate(arch.groups):
                    H, delta = _group_stats(layer, fp_inputs, g, group[0], streams, kwargs, device, prefix)
                    compress_group(layer, group, H, cfg, cfg.ratio, report, prefix, delta)
                streams["compressed"] = _propagate(layer, streams["compressed"], kwargs, device, offload)
            layers[i] = layer.to(offload) if offload != device else layer
            if ckpt is not None:
                ckpt.save(i, layers[i], arch, streams)
        except KeyboardInterrupt:
            if ckpt is not None:
                log(f"\ninterrupted: layers 0..{i - 1} are saved in {ckpt.dir}; rerun the same "
                    "command to resume")
            raise


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
        return _Recompute(original, arch, hidden, kwargs, device), _propagate(original, hidden, kwargs, device, offload)
    inputs = [[] for _ in arch.groups]
    handles = [original.get_submodule(g[0]).register_forward_pre_hook(
        lambda _m, args, store=inputs[i]: store.append(args[0].detach().float().to(offload)))
        for i, g in enumerate(arch.groups)]
    try:
        out = _propagate(original, hidden, kwargs, device, offload)
    finally:
        for h in handles:
            h.remove()
    return _Cached(inputs), out


def _group_stats(layer, fp_inputs, g: int, lead: str, streams: dict, kwargs: list, device, prefix):
    """Ĥ (and Δ against the FP stream's inputs, for two streams) for group g."""
    n = layer.get_submodule(lead).in_features
    gram = GramStats(n, device, name=prefix + lead)
    cross = CrossStats(n, device, name=prefix + lead) if fp_inputs is not None else None
    for b, kw in enumerate(kwargs):
        x_hat = input_of(layer, lead, streams["compressed"][b].to(device), kw)
        gram.add(x_hat)
        if cross is not None:
            cross.add(fp_inputs.get(g, b).to(device), x_hat)
    return gram.mean(), (cross.mean() if cross is not None else None)


def _plc(layers, arch, cfg, report, inputs: LayerInputs, device, offload, progress, log):
    """ERC's partial-layer compression: search k, then REC-compress the last k layers."""
    N = len(layers)
    candidates = plc_candidates(N, cfg.ratio, cfg.plc_step, cfg.residual_beta)
    first_needed = N - max(candidates)
    starts = {N - k for k in candidates}
    nb = len(inputs.hidden)
    search_batches = nb if cfg.plc_samples is None else max(1, -(-cfg.plc_samples // inputs.hidden[0].shape[0]))
    # One FP pass: Gram matrices of every layer, FP inputs where a candidate starts, FP output.
    grams, fp_at = [], {}
    hidden = inputs.hidden
    for i in tqdm(range(N), desc="fp statistics", disable=not progress):
        if i in starts:
            fp_at[i] = hidden[:search_batches]
        layer = layers[i].to(device)
        with group_grams(layer, arch, device, f"{i}.") as stats:
            hidden = _propagate(layer, hidden, inputs.kwargs[i], device, offload)
        grams.append([st.mean() for st in stats])
        layers[i] = layer.to(offload) if offload != device else layer
    fp_out = hidden[:search_batches]
    # Whitening and stage-1 SVD per matrix once; each candidate only re-truncates them.
    solved = {}
    for i in tqdm(range(first_needed, N), desc="whitened SVDs", disable=not progress):
        for group, H in zip(arch.groups, grams[i]):
            wh = whiten(H.to(device), cfg.whitening, cfg.damp_rel, cfg.max_damp_rel)
            report.damping[f"{i}.{group[0]}"] = wh.damp
            for name in group:
                W = layers[i].get_submodule(name).weight.detach().to(device)
                solved[(i, name)] = (wh, svd_of(target(W, wh), cfg.svd_dtype))

    def factors(i, name, layer_ratio):
        linear = layers[i].get_submodule(name)
        m, n = linear.weight.shape
        rank = rank_for_ratio(m, n, layer_ratio, f"layer {i} {name}")
        rr = residual_rank(m, n, rank, cfg.residual_beta)
        wh, svd = solved[(i, name)]
        return rank, rr, factors_from_svd(linear.weight.detach().to(device), svd, wh, rank, rr, cfg.svd_dtype)

    errors = {}
    for k in tqdm(candidates, desc="plc search", disable=not progress):
        layer_ratio = plc_layer_ratio(N, cfg.ratio, k)
        hidden = fp_at[N - k]
        for i in range(N - k, N):
            layer = copy.deepcopy(layers[i]).to(device)
            for name in (n for g in arch.groups for n in g):
                _, _, (U, V) = factors(i, name, layer_ratio)
                install(layer, name, U, V, layer.get_submodule(name))
            hidden = _propagate(layer, hidden, inputs.kwargs[i][:search_batches], device, offload)
            del layer
        num = sum(float(((h.double() - f.double()) ** 2).sum()) for h, f in zip(hidden, fp_out))
        den = sum(float((f.double() ** 2).sum()) for f in fp_out)
        errors[k] = (num / den) ** 0.5
        log(f"plc: last {k:3d} layers at ratio {layer_ratio:.4f}: final-layer relative error {errors[k]:.5f}")
    best = min(errors, key=errors.get)
    layer_ratio = plc_layer_ratio(N, cfg.ratio, best)
    log(f"plc: compressing the last {best} of {N} layers at ratio {layer_ratio:.4f}")
    for i in range(N - best, N):
        for name in (n for g in arch.groups for n in g):
            rank, rr, (U, V) = factors(i, name, layer_ratio)
            install(layers[i], name, U.to(offload), V.to(offload), layers[i].get_submodule(name))
            report.ranks[f"{i}.{name}"] = rank
            report.residual_ranks[f"{i}.{name}"] = rr
    report.plc = {"errors": errors, "layers": best, "layer_ratio": layer_ratio,
                  "search_windows": sum(h.shape[0] for h in fp_out)}
