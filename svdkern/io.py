"""Save and load compressed models as self-contained directories.

A directory holds config.json, the tokenizer, model.safetensors (factors U/V, never merged
dense weights) and svdkern.json (format version, method, per-module ranks). It is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .blocks import pad_ranks
from .models import architecture_of, set_submodule
from .nn import LowRankLinear

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
METADATA = "svdkern.json"


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched svdkern checkpoint."""


def low_rank_modules(model) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _retie_embeddings(model) -> None:
    """safetensors keeps one name of a tied pair; point the other at it, whichever it was."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    if inp.weight.is_meta and not out.weight.is_meta:
        inp.weight = out.weight
    elif out.weight.is_meta and not inp.weight.is_meta:
        out.weight = inp.weight


def save(model, directory: str, tokenizer=None, overwrite: bool = False) -> str:
    """Write `model` (with its LowRankLinear factors) and `tokenizer` to `directory` atomically."""
    from safetensors.torch import save_model

    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        config = model.config
        saved_quant = getattr(config, "quantization_config", None)
        if saved_quant is not None:  # a GGUF source: the factors are dense floats now
            del config.quantization_config
        try:
            config.save_pretrained(tmp)
        finally:
            if saved_quant is not None:
                config.quantization_config = saved_quant
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, WEIGHTS))
        report = getattr(model, "_svdkern_report", None)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_type": config.model_type,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "ranks": {n: m.rank for n, m in low_rank_modules(model).items()},
            "compression": None if report is None else {
                "config": report.config, "block_ratio": report.block_ratio,
                "model_ratio": report.model_ratio, "plc": report.plc,
                "residual_ranks": report.residual_ranks, "betas": report.betas,
                "aligned_ranks": report.aligned_ranks},
        }
        with open(os.path.join(tmp, METADATA), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        if os.path.exists(directory):
            old = directory + ".old"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(directory: str, device=None, dtype=None, pad_ranks_to: int | None = None):
    """A transformers model whose compressed layers are LowRankLinear, from `save`'s directory.

    pad_ranks_to: pad each factor pair with zeros to a multiple of this rank (exact, but stored),
    for aligned GPU kernel loads of factors saved unaligned (blocks.pad_ranks).
    """
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta_path = os.path.join(directory, METADATA)
    weights_path = os.path.join(directory, WEIGHTS)
    for path in (meta_path, weights_path, os.path.join(directory, "config.json")):
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory} is not an svdkern checkpoint: {os.path.basename(path)} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        version = meta["format_version"]
        ranks = meta["ranks"]
        saved_dtype = getattr(torch, meta["dtype"])
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt ({exc}); re-save the model") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has format version {version}; this svdkern reads {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != meta["model_type"]:
        raise CheckpointError(f"config.json says {config.model_type} but {METADATA} says {meta['model_type']}")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is corrupt or truncated ({exc}); re-save the model") from exc
    dtype = dtype or saved_dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    architecture_of(model)
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint names module {name}, which this {config.model_type} lacks") from exc
        low = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                            device="meta", dtype=dtype)
        set_submodule(model, name, low)
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{weights_path} holds {key}, which the model does not have")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the "
                                  f"model's {tuple(expected[key].shape)} (ranks in {METADATA} disagree?)")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    _retie_embeddings(model)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{weights_path} lacks {len(still_meta)} tensors, e.g. {still_meta[0]}")
    if pad_ranks_to is not None:
        pad_ranks(model, pad_ranks_to)
    model.eval()
    return model.to(device) if device is not None else model
