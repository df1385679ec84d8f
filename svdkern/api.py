"""The Python API: load a model, compress it, with the CLI's defaults."""
from __future__ import annotations

import os
import shutil

import torch

from . import distributed
from .bundled import BUNDLED, bundled_gguf
from .data import calibration_windows
from .hf_quantizer import mark_compressed
from .io import METADATA
from .io import check_replaceable
from .io import load as load_compressed
from .nn import LowRankLinear
from .pipeline import compress_model
from .presets import DEFAULT_METHOD, config_for

def load_model(spec: str, dtype=torch.float32, device=None, offload_dir: str | None = None,
               max_memory: str | None = None):
    """(model, tokenizer) from 'smollm2', a .gguf file, an svdkern directory, or a HF id/dir.

    offload_dir: a model larger than memory keeps what fits (`max_memory` of host memory, default
    what is free) and reads its other layers from this folder as the forward reaches them
    (accelerate's disk offload; safetensors models and svdkern directories).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import offload_kwargs

    named = spec
    if spec == BUNDLED:
        spec = bundled_gguf()
    if offload_dir is not None and spec.endswith(".gguf"):
        raise ValueError("offloading reads safetensors weights from disk; a .gguf model is loaded whole: "
                         "drop the offload directory")
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, name = os.path.split(os.path.abspath(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        _forget_gguf(model)
        source_dtype = "quantized"
    elif os.path.isfile(os.path.join(spec, METADATA)):
        model = load_compressed(spec, dtype=dtype, device=device if offload_dir else None,  # placed below
                                offload_dir=offload_dir, max_memory=max_memory)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        source_dtype = None
    else:
        from transformers import AutoConfig

        source_dtype = str(getattr(AutoConfig.from_pretrained(spec), "dtype", None) or "").replace("torch.", "") or None
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, **(offload_kwargs(device, offload_dir, max_memory) if offload_dir else {}))
    local = named != BUNDLED and os.path.exists(named)
    model._svdkern_source = {"model": os.path.abspath(named) if local else named,  # save() picks its
                             "dtype": source_dtype}                                # dtype from it
    model.eval()
    placed = device is None or offload_dir is not None  # accelerate placed an offloaded model
    return (model if placed else model.to(device)), tokenizer


def _forget_gguf(model) -> None:
    """transformers dequantizes a GGUF file on load but keeps its quantizer, which refuses
    save_pretrained; the model is plain `dtype` weights now, so it saves (and streams) as one."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def compress(model, method: str = DEFAULT_METHOD, ratio: float = 0.2, calib="wikitext2", tokenizer=None,
             nsamples: int = 64, seqlen: int = 512, seed: int = 0, sampler: str = "token-windows",
             device=None, batch_size: int = 8, checkpoint_dir: str | None = None,
             progress: bool = True, log=print, store=None, **knobs):
    """Compress `model` in place with a named method; returns the model.

    calib: 'wikitext2', a text file path, or a LongTensor of token windows (nsamples × seqlen).
    knobs: any CompressionConfig field (beta, aces_range, residual_beta, plc_step, ...).
    store: where the layers wait their turn (layer_store.py; `compress_from_disk` passes one).
    The CompressionReport is on `model._svdkern_report`.
    """
    cfg = config_for(method, ratio, **knobs)
    if isinstance(calib, torch.Tensor):
        windows = calib
    elif cfg.whitening is None:
        windows = torch.zeros(0, 0, dtype=torch.long)
    else:
        if tokenizer is None:
            raise ValueError(f"method {method!r} calibrates on text: pass tokenizer= (or token windows as calib=)")
        windows = calibration_windows(tokenizer, calib, nsamples, seqlen, seed, sampler)
    compress_model(model, windows, cfg, device=device, batch_size=batch_size,
                   checkpoint_dir=checkpoint_dir, progress=progress, log=log, store=store)
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        mark_compressed(model)  # model.save_pretrained now writes a directory that loads back
    model._svdkern_run = {  # what `save` records for `svdkern info`
        "method": method, "ratio": ratio,
        "calibration": (None if cfg.whitening is None else
                        {"text": calib if isinstance(calib, str) else "token windows given",
                         "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                         "seed": seed, "sampler": sampler})}
    return model


def compress_from_disk(directory: str, out: str, method: str = DEFAULT_METHOD, ratio: float = 0.2,
                       calib="wikitext2", tokenizer=None, *, dtype=torch.float32, save_dtype=None,
                       device=None, checkpoint_dir: str | None = None, overwrite: bool = False, **kwargs):
    """Compress a safetensors model directory larger than memory into `out`; returns the
    (meta-device) model, whose report is on `model._svdkern_report`.

    The model is built empty; each decoder layer is read from the shards for its turn, written to
    its own output shard once compressed, and freed (layer_store.DiskLayerStore), so host memory
    holds the embeddings, a layer or two and the calibration activations. With `checkpoint_dir`
    an interrupted run resumes. kwargs: as `compress` (nsamples, seqlen, batch_size, knobs, ...).
    """
    import tempfile

    from transformers import AutoTokenizer

    from .io import save_streamed
    from .layer_store import DiskLayerStore
    from .models import architecture_of
    from .shards import empty_model

    check_replaceable(os.path.abspath(out), overwrite)  # before hours of work, not after
    model, weights = empty_model(directory, dtype)
    source_dtype = str(getattr(model.config, "dtype", None) or "").replace("torch.", "") or None
    model._svdkern_source = {"model": os.path.abspath(directory), "dtype": source_dtype}
    if tokenizer is None and os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(directory)  # saved beside the factors
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = (os.path.join(checkpoint_dir, "model") if checkpoint_dir else
            tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".tmp-", dir=parent))
    if save_dtype is None:
        save_dtype = (getattr(torch, source_dtype) if source_dtype in ("bfloat16", "float16") and
                      dtype == torch.float32 else dtype)
    device = torch.device(device or "cpu")
    store = DiskLayerStore(model, weights, architecture_of(model).layers_path, device, "cpu", work,
                           dtype, save_dtype)
    try:
        compress(model, method, ratio, calib, tokenizer, device=device, checkpoint_dir=checkpoint_dir,
                 store=store, **kwargs)
        if distributed.rank() == 0:  # under torch.distributed rank 0 writes, as `svdkern compress` does
            save_streamed(model, store, out, tokenizer, overwrite=overwrite)
        elif not checkpoint_dir:
            shutil.rmtree(work, ignore_errors=True)  # this rank's own (empty) temporary directory
    except BaseException:
        if not checkpoint_dir:  # nothing to resume from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if (checkpoint_dir and distributed.rank() == 0 and os.path.isdir(checkpoint_dir)
            and not os.listdir(checkpoint_dir)):
        os.rmdir(checkpoint_dir)
    return model
