"""Text sources and token windows for calibration and evaluation.

`wikitext2` is the copy packaged with svdkern (svdkern/wikitext2/, gzip-compressed, with its
license and attribution), so every machine measures the same text, offline included;
$SVDKERN_DATA_DIR/wikitext2/ overrides it. Any other source is a path to a plain text file.
Python's own documentation text (`offline_english_text`) is a second, unrelated English text.
"""
from __future__ import annotations

import gzip
import os
import random
import warnings
from pathlib import Path

import torch

# split -> (local file, Hugging Face split). The dev protocol calibrates on the validation
# split (the only one shipped locally) and evaluates on the raw test split.
PACKAGED = Path(__file__).resolve().parent / "wikitext2"
_WIKITEXT2 = {"test": ("wiki.test.raw", "test"), "calibration": ("wiki.valid.tokens", "validation")}


class DataError(ValueError):
    """Data that cannot provide the windows asked for."""


def load_text(source: str, split: str) -> str:
    """Raw text for `source` ('wikitext2' or a file path) and split ('test' or 'calibration')."""
    return text_source(source, split)[0]


def text_source(source: str, split: str) -> tuple[str, str]:
    """(raw text, what it is), so every number can say which text it was measured on."""
    if source != "wikitext2":
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"data source {source!r} is neither 'wikitext2' nor an existing text file")
        return path.read_text(encoding="utf-8", errors="replace"), f"the text file {source}"
    filename, hf_split = _WIKITEXT2[split]
    data_dir = os.environ.get("SVDKERN_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / "wikitext2" / filename
        if path.is_file():
            return path.read_text(encoding="utf-8"), f"WikiText-2 {hf_split} ({path})"
        warnings.warn(f"SVDKERN_DATA_DIR is set but {path} does not exist; using the copy packaged with svdkern")
    packaged = PACKAGED / (filename + ".gz")
    if not packaged.is_file():
        raise DataError(f"svdkern's packaged WikiText-2 ({packaged}) is missing: reinstall svdkern, or set "
                        "SVDKERN_DATA_DIR to a directory holding wikitext2/" + filename)
    with gzip.open(packaged, "rt", encoding="utf-8") as f:
        return f.read(), f"WikiText-2 {hf_split} (packaged with svdkern)"


def offline_english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token sequence (1-D LongTensor)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def token_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows starting at torch.randint(0, N - seqlen, generator seed) (dev protocol)."""
    check_window_args(nsamples, seqlen)
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, too few for seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def svd_llm_windows(text: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The official SVD-LLM sampler: character offsets, 10*seqlen chars, first seqlen tokens."""
    check_window_args(nsamples, seqlen)
    rng = random.Random(seed)
    windows, tries = [], 0
    while len(windows) < nsamples:
        tries += 1
        if tries > 100 * nsamples or len(text) <= seqlen + 1:
            raise DataError(f"text too short to draw {nsamples} windows of {seqlen} tokens")
        i = rng.randint(0, len(text) - seqlen - 1)
        ids = tokenizer(text[i:i + 10 * seqlen], verbose=False)["input_ids"]
        if len(ids) >= seqlen:
            windows.append(torch.tensor(ids[:seqlen], dtype=torch.long))
    return torch.stack(windows)


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows (remainder dropped), optionally the first `windows`."""
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 to predict a token; got {seqlen}")
    count = ids.numel() // seqlen
    if count == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if windows is not None:
        if windows < 1:
            raise DataError(f"windows must be at least 1; got {windows}")
        count = min(count, windows)
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(tokenizer, source: str = "wikitext2", nsamples: int = 64,
                        seqlen: int = 512, seed: int = 0, sampler: str = "token-windows") -> torch.Tensor:
    """(nsamples, seqlen) token ids for calibration."""
    text = load_text(source, "calibration")
    if sampler == "token-windows":
        return token_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)
    if sampler == "svd-llm":
        return svd_llm_windows(text, tokenizer, nsamples, seqlen, seed)
    raise DataError(f"unknown sampler {sampler!r}; use 'token-windows' or 'svd-llm'")


def check_window_args(nsamples: int, seqlen: int) -> None:
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1; got {nsamples}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2; got {seqlen}")
