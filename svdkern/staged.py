"""Staged block executor (METHODS.md §5.5): a Llama-like layer's group inputs, each op run once.

The generic driver reaches group g's input by running the layer from its start and stopping
there, once per group, then runs the whole layer again to propagate: about 2.4 layer forwards
per layer and stream. A pre-norm Llama-like layer is

    h_mid = h + o_proj(attention(norm1(h)))      out = h_mid + down(act(gate(x)) * up(x)),  x = norm2(h_mid)

so each group's input follows from the previous stage's cached result, and the compressed
stream costs one forward per layer. Every intermediate is computed after the groups it depends
on were replaced, in the driver's group order, so the statistics are the generic driver's.
A layer that does not have this shape (OPT, Gemma 2/3's extra norms) is not staged; the first
layer of a run is checked against the layer's own forward before staging is trusted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import input_of, run_layer

_PARTS = ("input_layernorm", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def stageable(layer: nn.Module, groups) -> bool:
    """A pre-norm Llama-like layer with no norms beyond the two (Llama, Mistral, Qwen, Gemma 1)."""
    if tuple(tuple(g) for g in groups) != _GROUPS:
        return False
    if any(hasattr(layer, n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
        return False
    try:
        for name in _PARTS:
            layer.get_submodule(name)
    except AttributeError:
        return False
    return hasattr(layer.mlp, "act_fn")


class LlamaStages:
    """Per-micro-batch stage results of one layer on one stream (kept on `offload`)."""

    def __init__(self, layer, hidden: list, kwargs: list, device, offload):
        self.layer, self.hidden, self.kwargs = layer, hidden, kwargs
        self.device, self.offload = device, offload
        self.attn_out = {}   # b -> input of o_proj (needs q/k/v replaced first)
        self.h_mid = {}      # b -> residual after attention (needs o_proj replaced first)
        self.mlp_mid = {}    # b -> input of down_proj (needs gate/up replaced first)

    def _h(self, b):
        return self.hidden[b].to(self.device)

    def _o_input(self, b):
        if b not in self.attn_out:
            x = self.layer.input_layernorm(self._h(b))
            self.attn_out[b] = input_of(self.layer.self_attn, "o_proj", x, self.kwargs[b]).to(self.offload)
        return self.attn_out[b].to(self.device)

    def _mid(self, b):
        if b not in self.h_mid:
            self.h_mid[b] = (self._h(b) + self.layer.self_attn.o_proj(self._o_input(b))).to(self.offload)
            self.attn_out.pop(b)
        return self.h_mid[b].to(self.device)

    def _down_input(self, b):
        if b not in self.mlp_mid:
            mlp = self.layer.mlp
            x = self.layer.post_attention_layernorm(self._mid(b))
            self.mlp_mid[b] = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).to(self.offload)
        return self.mlp_mid[b].to(self.device)

    def group_input(self, g: int, b: int) -> torch.Tensor:
        """Input of group g for micro-batch b, once the groups before g hold their final weights."""
        if g == 0:
            return self.layer.input_layernorm(self._h(b))
        if g == 1:
            return self._o_input(b)
        if g == 2:
            return self.layer.post_attention_layernorm(self._mid(b))
        return self._down_input(b)

    def outputs(self) -> list:
        """The layer's outputs (every group final), freeing the stage results."""
        out = []
        for b in range(len(self.hidden)):
            y = self._mid(b) + self.layer.mlp.down_proj(self._down_input(b))
            out.append(y.to(self.offload))
            self.h_mid.pop(b)
            self.mlp_mid.pop(b)
        return out


def staged_matches_layer(layer, hidden, kwargs, device) -> bool:
    """Does the staged decomposition reproduce this layer's forward (first micro-batch)?"""
    h = hidden[:1]
    try:
        got = LlamaStages(layer, h, kwargs[:1], device, device).outputs()[0]
    except Exception:
        return False
    want = run_layer(layer, h[0].to(device), kwargs[0])
    tol = 1e-5 if want.dtype == torch.float32 else 2e-2
    return got.shape == want.shape and float((got - want).norm()) <= tol * float(want.norm())
