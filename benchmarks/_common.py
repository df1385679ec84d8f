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


def dev_protocol(nsamples=64, seqlen=512, windows=64, seed=0):
    """(model, tokenizer, calibration windows, evaluation windows) of the dev protocol."""
    model, tokenizer = svdkern.load_model("smollm2", torch.float32)
    calib = token_windows(tokenize(tokenizer, load_text("wikitext2", "calibration")), nsamples, seqlen, seed)
    evals = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), seqlen, windows)
    return model, tokenizer, calib, evals


def provenance() -> str:
    return (f"{datetime.date.today().isoformat()}, commit {commit()}, {platform.processor() or platform.machine()} "
            f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}")
