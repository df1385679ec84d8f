"""Running decoder blocks on cached calibration activations: capture, hooks, propagation.

Every driver (the compression pipeline, the sensitivity pass, refinement) works one decoder layer
at a time on per-micro-batch activations; these helpers are what they share.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .models import Architecture, set_submodule
from .nn import LowRankLinear
from .stats import GramStats


class StopForward(Exception):
    """Raised by a capture hook to end a forward once the wanted input is seen."""


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


def propagate(layer, hidden: list, kwargs: list, device, offload) -> list:
    return [run_layer(layer, h.to(device), kw).to(offload) for h, kw in zip(hidden, kwargs)]


def pad_ranks(root: nn.Module, multiple: int) -> dict:
    """Pad every LowRankLinear under `root` with zeros to a rank that is a multiple of `multiple`.

    Exact, and stored: for serving factors made without alignment (an older checkpoint, or
    rank_align=1) with aligned kernel loads at the cost of their size. Ranks that would reach
    min(m, n) are left alone. Returns {module name: (rank, stored rank)} for those that grew.
    """
    if multiple < 1:
        raise ValueError(f"pad to a positive multiple; got {multiple}")
    padded = {}
    for name, module in list(root.named_modules()):
        if isinstance(module, LowRankLinear):
            rank = -(-module.rank // multiple) * multiple
            if module.rank < rank < min(module.in_features, module.out_features):
                set_submodule(root, name, module.padded_to(rank))
                padded[name] = (module.rank, rank)
    return padded
