"""A model directory's safetensors shards, read one module at a time, and the empty model they fill.

For models larger than host memory (issue 12): `empty_model` builds the architecture on the meta
device (accelerate's `init_empty_weights`: buffers such as rotary frequencies stay real), and
`ShardedWeights.load_into` materializes one module's parameters from the shards that hold them,
reading only those tensors (safetensors maps the files; nothing else is read).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn as nn

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardedWeights:
    """The tensor names of a model directory and the shard file each one is in."""

    def __init__(self, directory: str):
        self.dir = os.fspath(directory)
        index, single = os.path.join(self.dir, INDEX), os.path.join(self.dir, SINGLE)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                self.weight_map = {key: SINGLE for key in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.dir} holds neither {INDEX} nor {SINGLE}: streaming from disk reads safetensors "
                "checkpoints (save the model with save_pretrained, or drop --stream-from-disk)")
        self.prefix = ""  # what the model's names carry and the checkpoint's lack ("model." for OPT hubs)

    def match_names(self, model: nn.Module) -> None:
        """Find how the model's parameter names map to the checkpoint's (a base-model prefix)."""
        names = [n for n, _ in model.named_parameters()]
        base = getattr(model, "base_model_prefix", "")
        for prefix in ("", f"{base}." if base else None):
            if prefix is not None and sum(n.removeprefix(prefix) in self.weight_map
                                          for n in names if n.startswith(prefix)) > len(names) // 2:
                self.prefix = prefix
                return
        raise ValueError(f"the tensors in {self.dir} do not match a {model.config.model_type} model's "
                         f"parameter names (e.g. {names[0]!r}): is config.json the checkpoint's own?")

    def load_into(self, module: nn.Module, name: str, dtype, device="cpu", only=None) -> None:
        """Materialize the parameters of `module` (called `name` in the model) from the shards
        (only those whose key `only(key)` accepts, when given)."""
        from safetensors import safe_open

        wanted = {}
        for key, _ in module.named_parameters():
            if only is not None and not only(key):
                continue
            full = f"{name}.{key}" if name else key
            stored = full.removeprefix(self.prefix) if full.startswith(self.prefix) else full
            if stored not in self.weight_map:
                raise ValueError(f"{self.dir} lacks the tensor {stored!r} of module {name or 'model'}: the "
                                 "checkpoint is incomplete or of another architecture")
            wanted.setdefault(self.weight_map[stored], []).append((key, stored))
        state = {}
        for file, keys in wanted.items():
            with safe_open(os.path.join(self.dir, file), "pt", device=str(device)) as f:
                for key, stored in keys:
                    tensor = f.get_tensor(stored)
                    state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        for key, value in state.items():
            _set_parameter(module, key, value)

    def digest(self) -> str:
        """A fingerprint of the weights without reading them all: names, shapes, dtypes and the
        first and last row of every tensor (a different fine-tune changes those)."""
        from safetensors import safe_open

        h = hashlib.sha256()
        by_file = {}
        for key, file in sorted(self.weight_map.items()):
            by_file.setdefault(file, []).append(key)
        for file in sorted(by_file):
            with safe_open(os.path.join(self.dir, file), "pt") as f:
                for key in by_file[file]:
                    part = f.get_slice(key)
                    shape = part.get_shape()
                    h.update(f"{key}{shape}{part.get_dtype()}".encode())
                    if shape:
                        for row in (part[:1], part[-1:]):
                            h.update(row.float().numpy().tobytes())
        return h.hexdigest()[:16]


def _set_parameter(module: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def empty_model(directory: str, dtype=torch.float32):
    """(model on the meta device but for its buffers, ShardedWeights of `directory`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = ShardedWeights(directory)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights.match_names(model)
    return model.eval(), weights

