"""Tile configs of the low-rank kernels: token-count buckets and shipped per-GPU tables.

Autotuning keyed on the raw token count would tune every prefill length anew (seconds each)
and would fail inside CUDA-graph capture. Configs are keyed on (regime, token bucket, N, K,
dtype) instead; `benchmarks/tune_lowrank.py` measures them for an architecture's shapes on a GPU
and writes `configs/lowrank_<GPU name>.json`, which is read here (the way vLLM ships tuned MoE
configs; no table is shipped until a GPU run writes one). A shape missing from the table is
autotuned once per bucket. CUDA-graph capture can neither time nor load a kernel: inside it a
launch not made before raises NotWarmedUpError (call svdkern.warm_up first).
SVDKERN_AUTOTUNE_MS="WARMUP,REP" shortens the autotuning's timing (Triton's default is 25 ms
warm-up, 100 ms repeat per config): the GPU suite and the GPU tests meet hundreds of new keys
and set "2,10".
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
REGIMES = ("shrink", "shrink_deterministic", "expand", "prefill")
MAX_BUCKET = 8192
_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_SIZE_M")


class NotWarmedUpError(RuntimeError):
    """A launch inside CUDA-graph capture needs a kernel never loaded before it (capture forbids
    loading). Defined here, away from Triton, so `svdkern` exports it where Triton is absent."""


def autotune_ms() -> tuple[float, float] | None:
    """(warm-up ms, repeat ms) per autotuned config from SVDKERN_AUTOTUNE_MS, or None (Triton's)."""
    raw = os.environ.get("SVDKERN_AUTOTUNE_MS", "").strip()
    if not raw:
        return None
    try:
        warmup, rep = (float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"SVDKERN_AUTOTUNE_MS must be 'WARMUP,REP' in ms (e.g. 2,10); got {raw!r}") from None
    if warmup <= 0 or rep <= 0:
        raise ValueError(f"SVDKERN_AUTOTUNE_MS must be positive; got {raw!r}")
    return warmup, rep


def token_bucket(tokens: int) -> int:
    """The smallest power of two ≥ tokens, capped at MAX_BUCKET (one tuning per bucket)."""
    if tokens < 1:
        raise ValueError(f"token count must be positive; got {tokens}")
    return min(1 << (tokens - 1).bit_length(), MAX_BUCKET)


def table_path(device_name: str) -> str:
    return os.path.join(CONFIG_DIR, f"lowrank_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json")


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> dict:
    """{regime: {"N,K": {bucket: config}}} from a table file; {} when there is none."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    table = {}
    for regime, shapes in raw.get("configs", {}).items():
        if regime not in REGIMES:
            raise ValueError(f"{path}: unknown regime {regime!r}; expected one of {REGIMES}")
        for shape in shapes:
            if len(shape.split(",")) != 3:
                raise ValueError(f"{path}: shape key {shape!r} is not 'N,K,dtype' (an older table?); "
                                 "regenerate it with benchmarks/tune_lowrank.py")
        table[regime] = {shape: {int(b): _checked(cfg, path) for b, cfg in buckets.items()}
                         for shape, buckets in shapes.items()}
    return table


def _checked(cfg: dict, path: str) -> dict:
    missing = [k for k in (*_META, "num_warps", "num_stages") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: a config lacks {missing}; regenerate it with benchmarks/tune_lowrank.py")
    return cfg


def shape_key(N: int, K: int, dtype) -> str:
    """Table key of one GEMM: tiles that fit shared memory in bf16 may not in fp32."""
    return f"{N},{K},{str(dtype).replace('torch.', '')}"


def lookup(table: dict, regime: str, tokens: int, N: int, K: int, dtype) -> dict | None:
    """The tuned config for this GEMM at the nearest bucket (log scale), or None.

    A shape the table lacks takes the nearest tuned one of the same dtype within 25% in N and
    in K (ranks differ by policy and alignment; the best tiles barely move with them).
    """
    shapes = table.get(regime, {})
    buckets = shapes.get(shape_key(N, K, dtype))
    if not buckets:
        name = str(dtype).replace("torch.", "")
        near = []
        for key, entry in shapes.items():
            n2, k2, d2 = key.split(",")
            dn, dk = abs(math.log(int(n2) / N)), abs(math.log(int(k2) / K))
            if d2 == name and dn <= math.log(1.25) and dk <= math.log(1.25):
                near.append((dn + dk, key))
        if not near:
            return None
        buckets = shapes[min(near)[1]]
    want = token_bucket(tokens).bit_length()
    return buckets[min(buckets, key=lambda b: (abs(b.bit_length() - want), b))]


def split_meta(cfg: dict) -> tuple[dict, dict]:
    """(kernel meta-parameters, launch options) of one config."""
    return ({k: cfg[k] for k in _META},
            {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def write_table(path: str, device_name: str, configs: dict, provenance: dict) -> None:
    """Write a table atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"device": device_name, **provenance,
              "configs": {regime: {shape: {str(b): cfg for b, cfg in sorted(buckets.items())}
                                   for shape, buckets in sorted(shapes.items())}
                          for regime, shapes in sorted(configs.items())}}
    fd, tmp = tempfile.mkstemp(prefix=".lowrank-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    load_table.cache_clear()
