"""Architecture adapters: where the decoder layers are and which linears share an input.

Every method works on decoder layers one at a time and needs, for each layer, the linear
layers grouped by the activation they read (q/k/v read the same normed hidden state, so they
share one Gram matrix). Groups are listed in execution order, which sequential methods rely on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter, or does not look like the adapter expects."""


@dataclass(frozen=True)
class Architecture:
    layers_path: str                  # attribute path from the CausalLM to the ModuleList of layers
    groups: tuple[tuple[str, ...], ...]  # linears per shared input, in execution order


_LLAMA_LIKE = Architecture(
    layers_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "opt": Architecture(
        layers_path="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The adapter for `model`, checked against the model's actual modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported (known: {known}). Add an entry to "
            "svdkern.models.ARCHITECTURES naming its decoder-layer list and its linear layers "
            "grouped by shared input."
        )
    arch = ARCHITECTURES[model_type]
    layers = _get_path(model, arch.layers_path, model_type)
    if len(layers) == 0:
        raise UnsupportedArchitectureError(f"{model_type}: {arch.layers_path} holds no layers")
    for name in (n for g in arch.groups for n in g):
        module = _get_path(layers[0], name, model_type)
        if not isinstance(module, nn.Linear) and not hasattr(module, "rank"):
            raise UnsupportedArchitectureError(
                f"{model_type}: layer 0's {name} is a {type(module).__name__}, not nn.Linear; "
                "the adapter in svdkern.models.ARCHITECTURES does not fit this model"
            )
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get_path(model, architecture_of(model).layers_path, model.config.model_type)


def _get_path(root: nn.Module, path: str, model_type: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedArchitectureError(
                f"{model_type}: module has no {path!r} (missing {part!r}); the adapter in "
                "svdkern.models.ARCHITECTURES does not fit this model"
            )
        obj = getattr(obj, part)
    return obj


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
