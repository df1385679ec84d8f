"""The language-model head applied in token chunks, so no pass holds a whole window's logits.

A 262k-token vocabulary (Gemma3) makes one 512-token window's fp32 logits 0.5 GiB, and their
log-softmax and gradient as much again each; the sensitivity pass and end-to-end tuning instead
run the head on `chunk_tokens(vocab)` tokens at a time, under activation checkpointing when a
gradient is wanted, so only one chunk's logits exist at once.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 128 << 20  # fp32 logits of one chunk


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: CHUNK_BYTES of fp32 logits (at least 16 tokens)."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What `model(...).logits` computes from the base model's last hidden state, in fp32
    (lm_head, then Gemma2/3's final logit soft-capping where the config sets it)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden state (after its final norm), the head's input."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def chunked_sum(model: nn.Module, hidden: torch.Tensor, per_chunk, *extra: torch.Tensor) -> torch.Tensor:
    """Σ over token chunks of per_chunk(logits, *extra_chunk) for hidden (B, T, d) and each extra
    (B, T, ...); with a gradient, each chunk's logits are recomputed in the backward pass."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    extra = [e.reshape(flat.shape[0], *e.shape[2:]) for e in extra]
    step = chunk_tokens(model.get_output_embeddings().weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)

    def piece(h, *e):
        return per_chunk(head_logits(model, h), *e)

    for s in range(0, flat.shape[0], step):
        args = (flat[s:s + step], *(e[s:s + step] for e in extra))
        if torch.is_grad_enabled() and flat.requires_grad:
            total = total + checkpoint(piece, *args, use_reentrant=False)
        else:
            total = total + piece(*args)
    return total


class _Head(nn.Module):
    """Stands in for a decoder layer so that a model call runs only the model's head: the last
    one returns `value` (the final hidden state) whatever it is given; the others pass it on."""

    def __init__(self, last: bool):
        super().__init__()
        self.last, self.value = last, None

    def forward(self, hidden_states, *args, **kwargs):
        return self.value if self.last else hidden_states


@contextmanager
def head_only(layers: nn.ModuleList):
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Head(i == len(layers) - 1)
    try:
        yield layers[-1]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
