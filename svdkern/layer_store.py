"""Where decoder layers wait between their turns on the compute device: in memory, or on disk.

Every pass over the layers (the compression driver, PLC's search, the spectra of the rank
policies) takes a layer with `fetch(i)` and hands it back with `put_back` (unchanged) or
`commit` (compressed, final). `LayerStore` keeps the layers in the model, as svdkern always did;
`DiskLayerStore` (issue 12) reads each layer from the source's safetensors shards when fetched,
writes each committed layer as one shard of the output directory, and leaves the layer on the
meta device otherwise, so host memory holds one or two layers whatever the model's depth.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os

import torch
import torch.nn as nn

from . import distributed
from .clock import timed
from .models import Architecture, set_submodule
from .nn import LowRankLinear, install


class LayerStore:
    """The model's own layers, moved to the compute device for their turn and back to `offload`."""

    writes_factors = False  # the checkpoint keeps the factors of finished layers itself

    def __init__(self, layers: nn.ModuleList, device, offload):
        self.layers, self.device, self.offload = layers, torch.device(device), torch.device(offload)

    def __len__(self) -> int:
        return len(self.layers)

    def fetch(self, i: int) -> nn.Module:
        return self.layers[i].to(self.device)

    def put_back(self, i: int, layer: nn.Module) -> None:
        self.layers[i] = layer.to(self.offload) if self.offload != self.device else layer

    def commit(self, i: int, layer: nn.Module) -> None:
        self.put_back(i, layer)

    def restore(self, i: int, arch: Architecture, saved_factors) -> None:
        """Put back the factors a checkpoint saved for finished layer i (`saved_factors()` reads them)."""
        tensors = saved_factors()
        for name in (n for g in arch.groups for n in g):
            if name + ".U" in tensors:  # matrices the policy kept dense are not saved
                linear = self.layers[i].get_submodule(name)
                install(self.layers[i], name, tensors[name + ".U"], tensors[name + ".V"], linear)
        rest = {k: v for k, v in tensors.items() if not k.endswith((".U", ".V"))}
        if rest:  # a checkpoint of the whole layer (Checkpoint.save's whole_layer)
            self.layers[i].load_state_dict(rest, strict=False)

    def weights_digest(self, model) -> str:
        """Exact values at fixed positions of every parameter (a resumed run must see the same)."""
        weights = hashlib.sha256()
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            weights.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            weights.update(sample.float().cpu().numpy().tobytes())
        return weights.hexdigest()[:16]


class DiskLayerStore(LayerStore):
    """Layers read from `weights` (shards.ShardedWeights) on fetch; committed ones written to
    `out_dir/layer-NNNNN.safetensors` in `save_dtype`; every layer off its turn on the meta device."""

    writes_factors = True  # a finished layer's shard is its checkpoint

    def __init__(self, model, weights, layers_path: str, device, offload, out_dir: str, dtype, save_dtype):
        layers = model.get_submodule(layers_path)
        super().__init__(layers, device, offload)
        self.weights, self.layers_path, self.out_dir = weights, layers_path, out_dir
        self.dtype, self.save_dtype = dtype, save_dtype
        os.makedirs(out_dir, exist_ok=True)
        _fixed_mmap_threshold()
        model.tie_weights()  # tied embeddings: one parameter, read once
        inside = layers_path + "."
        for name, param in list(model.named_parameters()):
            if not name.startswith(inside):
                owner, _, _ = name.rpartition(".")
                weights.load_into(model.get_submodule(owner), owner, dtype,
                                  only=lambda key, leaf=name.rpartition(".")[2]: key == leaf)
        model.tie_weights()

    def fetch(self, i: int) -> nn.Module:
        with timed("reading shards"):
            self.weights.load_into(self.layers[i], f"{self.layers_path}.{i}", self.dtype)
        return self.layers[i].to(self.device)

    def put_back(self, i: int, layer: nn.Module) -> None:
        self.layers[i] = layer.to("meta")  # frees it; the next fetch reads the shards again
        _trim()

    def commit(self, i: int, layer: nn.Module) -> None:
        """Write layer i's shard (rank 0 only, under torch.distributed: every rank holds the same
        factors) and free the layer."""
        from safetensors.torch import save_file

        if distributed.rank() != 0:
            self.put_back(i, layer)
            return
        prefix = f"{self.layers_path}.{i}."
        tensors = {prefix + k: v.detach().to(self.save_dtype if v.is_floating_point() else v.dtype)
                   .contiguous().cpu() for k, v in layer.state_dict().items()}
        path = self.shard_path(i)
        with timed("writing shards"):
            save_file(tensors, path + ".tmp", metadata={"format": "pt"})
            os.replace(path + ".tmp", path)
        self.put_back(i, layer)

    def shard_path(self, i: int) -> str:
        return os.path.join(self.out_dir, f"layer-{i:05d}.safetensors")

    def restore(self, i: int, arch: Architecture, saved_factors) -> None:
        """Finished layer i is in its output shard: rebuild its modules on meta at the saved ranks."""
        from safetensors import safe_open

        path = self.shard_path(i)
        if not os.path.isfile(path):
            raise RuntimeError(f"the checkpoint says layer {i} is done, but its output shard {path} is "
                               "missing: delete the checkpoint directory to start afresh")
        prefix = f"{self.layers_path}.{i}."
        with safe_open(path, "pt") as f:
            shapes = {key.removeprefix(prefix): f.get_slice(key).get_shape() for key in f.keys()}
        layer = self.layers[i]
        for name in (n for g in arch.groups for n in g):
            if name + ".U" in shapes:
                linear = layer.get_submodule(name)
                low = LowRankLinear(linear.in_features, linear.out_features, shapes[name + ".U"][1],
                                    linear.bias is not None, device="meta", dtype=linear.weight.dtype)
                set_submodule(layer, name, low)

    def weights_digest(self, model) -> str:
        return self.weights.digest()

    def shards(self) -> dict[str, str]:
        """{tensor name: shard file} of the layers written so far."""
        from safetensors import safe_open

        out = {}
        for i in range(len(self.layers)):
            if os.path.isfile(self.shard_path(i)):
                with safe_open(self.shard_path(i), "pt") as f:
                    out.update({key: os.path.basename(self.shard_path(i)) for key in f.keys()})
        return out


def write_index(directory: str, weight_map: dict) -> None:
    """model.safetensors.index.json for the shards in `directory` (what from_pretrained reads)."""
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in set(weight_map.values()))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its heap does not need the help below
        return None


def _trim() -> None:
    """Give the freed layer's heap pages back to the OS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _fixed_mmap_threshold() -> None:
    """Have glibc serve every allocation of 1 MiB or more by mmap, returned at its free.

    By default glibc raises that threshold each time a large block is freed, after which tensors
    come from the heap and freed layers leave fragments behind: the streaming peak crept up layer
    after layer to twice the working set in test_streaming's measurement. Process-wide, as
    MALLOC_MMAP_THRESHOLD_ would be; the cost is a page fault per fresh large tensor.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
