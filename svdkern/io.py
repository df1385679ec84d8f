"""Save and load compressed models as self-contained directories.

A directory holds config.json (with the svdkern quantization_config: per-module ranks), the
tokenizer, model.safetensors (factors U/V, never merged dense weights) and svdkern.json (format
version, method, report). It is written to a temporary sibling and renamed into place, so a
crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .blocks import pad_ranks
from .hf_quantizer import (FORMAT_VERSION, LEGACY_METHOD, QUANT_METHOD, CheckpointError, mark_compressed,
                           marked_state_dict)

WEIGHTS = "model.safetensors"
METADATA = "svdkern.json"
__all__ = ["CheckpointError", "check_replaceable", "load", "save", "save_dtype", "save_streamed"]


def check_replaceable(directory: str, overwrite: bool) -> None:
    """Refuse to write over `directory` unless asked to, and then only over an svdkern output (or
    an empty directory): overwrite must never delete a user's unrelated files."""
    if not os.path.exists(directory):
        return
    if not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if os.path.isdir(directory) and (not os.listdir(directory) or os.path.isfile(os.path.join(directory, METADATA))):
        return
    raise FileExistsError(f"{directory} is not an svdkern output (no {METADATA}), so overwrite will not delete "
                          "it: choose another output directory, or remove it yourself")


def save(model, directory: str, tokenizer=None, overwrite: bool = False, dtype=None) -> str:
    """Write `model` (with its LowRankLinear factors) and `tokenizer` to `directory` atomically.

    The directory loads with stock `AutoModelForCausalLM.from_pretrained` once svdkern is
    imported (hf_quantizer.py), and with `svdkern.load`. dtype: what the tensors are stored in;
    default `save_dtype(model)`.
    """
    directory = os.path.abspath(directory)
    check_replaceable(directory, overwrite)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    dtype = dtype or save_dtype(model)
    try:
        config = mark_compressed(model)
        model.hf_quantizer.save_dtype = dtype
        config_dtype = model.config.dtype
        try:
            model.save_pretrained(tmp)
        finally:
            model.config.dtype = config_dtype
            model.hf_quantizer.save_dtype = None
        _set_config_dtype(os.path.join(tmp, "config.json"), dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_metadata(model, tmp, dtype, config)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_streamed(model, store, directory: str, tokenizer=None, overwrite: bool = False) -> str:
    """Finish a model compressed through a DiskLayerStore (layer_store.py): its layers are already
    shards in `store.out_dir`; add the rest of the model, the index, config and metadata there,
    then rename it to `directory` (the same layout `svdkern.load` and from_pretrained read)."""
    from safetensors.torch import save_file

    from .layer_store import write_index

    directory = os.path.abspath(directory)
    check_replaceable(directory, overwrite)
    work, dtype = store.out_dir, store.save_dtype
    config = mark_compressed(model)
    inside, seen, rest = store.layers_path + ".", set(), {}
    for key, value in marked_state_dict(model, config, dtype).items():
        if not key.startswith(inside) and id(value) not in seen:  # tied tensors are stored once
            seen.add(id(value))
            rest[key] = value.contiguous().cpu()
    save_file(rest, os.path.join(work, "rest.safetensors"), metadata={"format": "pt"})
    write_index(work, {**store.shards(), **{key: "rest.safetensors" for key in rest}})
    model.config.save_pretrained(work)
    _set_config_dtype(os.path.join(work, "config.json"), dtype)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(work)
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    _write_metadata(model, work, dtype, config)
    _move_into_place(work, directory)
    return directory


def _write_metadata(model, directory: str, dtype, config) -> None:
    report = getattr(model, "_svdkern_report", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "dtype": str(dtype).replace("torch.", ""),
        "ranks": config.ranks,
        "source": getattr(model, "_svdkern_source", None),
        "run": getattr(model, "_svdkern_run", None),
        "evaluation": getattr(model, "_svdkern_eval", None),
        "compression": None if report is None else {
            "config": report.config, "block_ratio": report.block_ratio,
            "model_ratio": report.model_ratio, "seconds": report.seconds, "plc": report.plc,
            "residual_ranks": report.residual_ranks, "betas": report.betas,
            "damping": report.damping, "aligned_ranks": report.aligned_ranks,
            "truncation": report.truncation, "layer_ranks": report.ranks, "tune": report.tune},
    }
    with open(os.path.join(directory, METADATA), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def _move_into_place(tmp: str, directory: str) -> None:
    """Rename the finished `tmp` to `directory` (replacing an old one only once `tmp` is whole)."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is not
    for name in os.listdir(tmp):  # some writers (safetensors) make their files private
        os.chmod(os.path.join(tmp, name), 0o666 & ~_umask())
    if os.path.exists(directory):
        old = directory + ".old"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def save_dtype(model) -> torch.dtype:
    """The model's own dtype, except bf16 for a model loaded in fp32 from a half-precision or
    quantized source (GGUF): fp32 there only stores rounding noise at twice the size."""
    dtype = next(model.parameters()).dtype
    source = (getattr(model, "_svdkern_source", None) or {}).get("dtype")
    if dtype == torch.float32 and source in ("float16", "bfloat16", "quantized"):
        return torch.bfloat16
    return dtype


def _set_config_dtype(path: str, dtype) -> None:
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).replace("torch.", "")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def offload_kwargs(device, offload_dir: str, max_memory: str | None = None) -> dict:
    """from_pretrained's arguments for a model larger than memory: accelerate keeps what fits
    (the compute device first, then `max_memory` of host memory) and reads the other layers
    from `offload_dir` as the forward reaches them."""
    from accelerate.utils import get_max_memory

    device = torch.device(device or "cpu")
    budget = {k: v for k, v in get_max_memory().items()
              if k == "cpu" or (device.type == "cuda" and k == (device.index or 0))}
    if max_memory is not None:
        budget["cpu"] = max_memory
    os.makedirs(offload_dir, exist_ok=True)
    return {"device_map": "auto", "offload_folder": offload_dir, "max_memory": budget}


def check_directory(directory: str) -> None:
    """What `load` checks before loading, as a CheckpointError that says what is wrong: the files,
    the format version, every weights shard readable and whole, the factors' shapes against the
    ranks (`svdkern info` runs it too, so a truncated file is not reported as a normal model)."""
    from safetensors import SafetensorError, safe_open

    directory = os.fspath(directory)
    meta_path, config_path = os.path.join(directory, METADATA), os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, WEIGHTS)
    index_path = weights_path + ".index.json"  # save_pretrained shards models past 50 GB
    for path in (meta_path, weights_path if not os.path.isfile(index_path) else index_path, config_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory} is not an svdkern checkpoint: {os.path.basename(path)} is missing")
    try:
        with open(meta_path) as f:
            version = json.load(f)["format_version"]
        with open(config_path) as f:
            quant = json.load(f).get("quantization_config") or {}
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{directory}: {exc.__class__.__name__} reading its metadata ({exc}); "
                              "it is corrupt: re-save the model") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was saved by a newer svdkern (format {version}; this one reads up "
                              f"to {FORMAT_VERSION}): upgrade svdkern (pip install -U svdkern)")
    if version < FORMAT_VERSION or quant.get("quant_method") not in (QUANT_METHOD, LEGACY_METHOD):
        raise CheckpointError(f"{directory} has format {version}, from an older svdkern that stock transformers "
                              "cannot load: compress the model again to re-save it")
    shards = [weights_path]
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted({os.path.join(directory, name) for name in json.load(f)["weight_map"].values()})
    shapes = {}
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{shard} is corrupt or truncated ({exc}); re-save the model") from exc
    for name, rank in quant.get("ranks", {}).items():
        got = shapes.get(f"{name}.U")
        if got is None:
            raise CheckpointError(f"the weights lack {name}.U, which config.json's ranks list")
        if got[1] != rank:
            raise CheckpointError(f"{name}.U: checkpoint shape {got} does not match rank {rank} in config.json")


def load(directory: str, device=None, dtype=None, pad_ranks_to: int | None = None,
         offload_dir: str | None = None, max_memory: str | None = None):
    """A transformers model whose compressed layers are LowRankLinear, from `save`'s directory.

    The short path to `AutoModelForCausalLM.from_pretrained(directory)` (the same quantizer),
    with every mismatch turned into a CheckpointError that says what is wrong.
    pad_ranks_to: pad each factor pair with zeros to a multiple of this rank (exact, but stored),
    for aligned GPU kernel loads of factors saved unaligned (blocks.pad_ranks).
    offload_dir: for a model larger than memory, layers beyond `max_memory` (default: what is
    free) are read from this folder during the forward (`offload_kwargs`).
    """
    from transformers import AutoModelForCausalLM

    directory = os.fspath(directory)
    check_directory(directory)
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    if offload_dir is not None:
        if pad_ranks_to is not None:
            raise ValueError("pad_ranks_to pads factors in memory; it cannot be combined with offload_dir")
        kwargs.update(offload_kwargs(device, offload_dir, max_memory))
    elif device is not None:
        kwargs["device_map"] = str(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{directory} does not load ({exc.__class__.__name__}: {str(exc)[:300]})") from exc
    if pad_ranks_to is not None:
        pad_ranks(model, pad_ranks_to)
        mark_compressed(model)  # the ranks save_pretrained records are the padded ones
    model.eval()
    return model
