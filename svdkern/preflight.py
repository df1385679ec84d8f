"""Checks that run before the expensive work: where a model is, whether the hub is reachable,
whether a run's sequence length and memory fit. Each failure is one line naming the fix.

A bad argument costs nothing here; found after a model load and a dense evaluation it costs
minutes (an hour on a large vocabulary), and a run that outgrows memory is killed by the OS.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from .bundled import bundled_gguf
from .host import proc_bytes
from .io import METADATA

GIB = 2 ** 30


class PreflightError(ValueError):
    """An argument or resource that would make the run fail later."""


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE says so, or the hub does not answer within two seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return False
    except OSError:
        return True


def go_offline_if_unreachable() -> bool:
    """Set HF_HUB_OFFLINE when the hub is unreachable, so hub clients fail (or use their cache)
    at once instead of retrying for half a minute. Call before transformers is imported."""
    offline = hub_offline()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return offline


def check_model_source(spec: str) -> None:
    """Refuse a model argument that cannot name a model, before anything loads."""
    if spec == "smollm2":
        return
    path = os.path.expanduser(spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(path):
            raise PreflightError(f"no GGUF file at {spec}")
        return
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", METADATA)):
            return
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        hint = f"; pass the file itself: --model {os.path.join(spec, ggufs[0])}" if ggufs else ""
        raise PreflightError(f"{spec} is a directory but holds no model (no config.json){hint}")
    if os.path.isfile(path):
        raise PreflightError(f"{spec} is a file but not a .gguf model: pass the model's directory")
    looks_local = spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1
    if looks_local:
        raise PreflightError(f"no model at {spec}: the path does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(spec):
        raise PreflightError(f"{spec} is neither a local path nor in the Hugging Face cache, and the "
                             "hub is unreachable (offline): download it first or pass a local directory")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def check_text_source(source: str, seqlen: int | None = None) -> None:
    """An existing text file (or 'wikitext2'); with `seqlen`, one long enough for a window (every
    token covers at least one byte, so a file of at most `seqlen` bytes cannot give one)."""
    if source == "wikitext2":
        return
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise PreflightError(f"text source {source!r} is neither 'wikitext2' nor an existing text file")
    size = os.path.getsize(path)
    if seqlen is not None and size <= seqlen:
        raise PreflightError(f"text file {source} holds {size} bytes, too short for one window of {seqlen} tokens: "
                             "give a longer text (or a smaller --seqlen)")


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise PreflightError(f"--{name.replace('_', '-')} must be at least 1; got {value}")


def check_model_fits(spec: str, itemsize: int) -> None:
    """Refuse to load a safetensors directory that will not fit in host memory at `itemsize`
    bytes a weight, pointing at `--stream-from-disk` (checked from the files, before loading)."""
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        return
    shards = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    if not shards:
        return
    from safetensors import safe_open

    need = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                need += math.prod(part.get_shape()) * itemsize
    free = available_host_bytes()
    if free is not None and need > free:
        raise PreflightError(f"{spec} needs about {need / GIB:.1f} GiB of host memory at this --dtype and "
                             f"{free / GIB:.1f} GiB is available: pass --stream-from-disk to read one layer "
                             "at a time (or --dtype bfloat16)")


def check_context_early(spec: str, seqlen: int) -> None:
    """--seqlen against the context length in a local model's config alone (config.json or the
    GGUF header): seconds, before the weights load. Hub ids wait for the load (no network here)."""
    from transformers import AutoConfig

    path = os.path.expanduser(spec)
    if spec == "smollm2":

        try:
            path = bundled_gguf()
        except FileNotFoundError as exc:
            raise PreflightError(str(exc)) from None
    if path.endswith(".gguf") and os.path.isfile(path):
        folder, name = os.path.split(os.path.abspath(path))
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = AutoConfig.from_pretrained(path)
    else:
        return
    check_context(config, seqlen)


def check_context(config, seqlen: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise PreflightError(f"--seqlen {seqlen} exceeds the model's context length {limit} "
                             "(max_position_embeddings): lower --seqlen")


@dataclass
class MemoryEstimate:
    """Bytes a run adds to the loaded model (already resident, so MemAvailable counts it)."""

    host: dict      # what -> bytes, in host memory
    device: dict    # what -> bytes, on the accelerator (empty on CPU runs)


def estimate_memory(model, stream: str | None, nsamples: int, seqlen: int, eval_batch: int | None,
                    device: str, fp_cache_bytes: int = 4 << 30, tune_params: int = 0,
                    tune_topk: int = 0) -> MemoryEstimate:
    """Peak bytes of a compress/eval run, by its largest terms (an estimate, not a bound).

    tune_params: factor parameters that end-to-end tuning trains (0: no tuning); each costs its
    gradient and AdamW's two fp32 moments, plus an fp32 master copy and its gradient when the
    model is in half precision; the dense targets (top-k ids and log-probabilities) stay on the host.
    """
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "word_embed_proj_dim", 0)
    vocab = getattr(cfg, "vocab_size", 0)
    itemsize = next(model.parameters()).element_size()
    host, dev = {}, {}
    if stream is not None:
        tokens = nsamples * seqlen
        streams = {"fp": 1, "compressed": 1, "both": 2}[stream]
        # each stream's activations, plus the next layer's while the old ones are alive
        host["calibration activations"] = 2 * streams * tokens * hidden * itemsize
        if stream == "both":
            host["FP group-input cache"] = min(fp_cache_bytes, tokens * hidden * 4 * 4)
    if tune_params:
        per_param = 12 if itemsize == 4 else 16 + itemsize
        (dev if device != "cpu" else host)["end-to-end tuning"] = tune_params * per_param
        host["tuning targets"] = nsamples * seqlen * (tune_topk * 12 + 4)
    if eval_batch:
        # fp32 logits of one evaluation batch, their copy and the cross-entropy's
        (dev if device != "cpu" else host)["evaluation logits"] = 3 * eval_batch * seqlen * vocab * 4
    return MemoryEstimate(host, dev)


def available_host_bytes() -> int | None:
    return proc_bytes("/proc/meminfo", "MemAvailable")


def check_memory(estimate: MemoryEstimate, device: str) -> None:
    """Refuse a run whose estimate exceeds what is free beside the loaded model."""
    _refuse_if_short(estimate.host, available_host_bytes(), "host memory", "is available")
    if estimate.device and torch.cuda.is_available() and device.startswith("cuda"):
        _refuse_if_short(estimate.device, torch.cuda.mem_get_info(torch.device(device))[0],
                         f"memory on {device}", "is free")


def _refuse_if_short(parts: dict, free: int | None, where: str, verb: str) -> None:
    need = sum(parts.values())
    if free is not None and need > free:
        described = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in parts.items())
        tuning = ", or turn end-to-end tuning off with --tune-epochs 0" if "end-to-end tuning" in parts else ""
        raise PreflightError(f"this run needs about {need / GIB:.1f} GiB of {where} beside the loaded "
                             f"model ({described}) and {free / GIB:.1f} GiB {verb}: lower --nsamples, "
                             f"--seqlen or the evaluation's --batch-size/--eval-windows{tuning}")
