"""Triton kernels for y = U (V x) + b (KERNELS.md §3, §7).

One NT-GEMM kernel, C = A·Bᵀ (+ bias), serves both steps of both regimes:

* decode (T ≤ DECODE_MAX_TOKENS, memory-bound): the shrink t = x·Vᵀ is split over n (SPLIT_K
  programs per tile, relaxed fp32 atomics into a (T, k) workspace that stays in L2; without
  split-K, and so bit-reproducible, under torch.use_deterministic_algorithms(True)), then the
  expand y = t·Uᵀ + b rounds t to the weights' dtype (as two matmuls do), runs the whole rank
  per program on tensor cores and adds the bias in its epilogue;
* prefill: two tiled tensor-core GEMMs with grouped program order for L2 reuse, t kept in the
  input dtype (as two unfused matmuls keep it), bias fused into the second epilogue.

Accumulation is fp32 everywhere; fp32 inputs use IEEE products (no TF32). Offsets are int64
(T·n passes 2³¹ at about 195k tokens of width 11008). Tile configs come from the per-GPU table
that tune_lowrank.py writes, by (regime, token bucket, N, K, dtype), else are autotuned once per
bucket (lowrank_configs.py); under TRITON_INTERPRET=1 (CPU tests) fixed small configs run
instead. Launches happen on the inputs' device whatever the current one is. The launchers allocate only their output and
workspace and never sync, so they can be captured in CUDA graphs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from . import lowrank_configs

DECODE_MAX_TOKENS = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _matmul_nt_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """C[M, N] (+)= A[M, K] · B[N, K]ᵀ (+ bias[N]); SPLIT_K > 1 atomically adds fp32 partials.

    M_BUCKET (unused in the body) is the autotuner's key in place of M.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_SIZE_M * num_n
    first_m = (pid // group) * GROUP_SIZE_M
    size_m = min(num_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    # int64 offsets: row·stride passes 2³¹ on long prefills and strided views
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        if a.dtype != b.dtype:  # decode expand: the fp32 workspace meets a half-precision U.
            a = a.to(b.dtype)  # round t as two matmuls do; tensor-core products, fp32 sums
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")  # no ordering needed: sums only
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bk, split, warps=4, stages=3, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                          "GROUP_SIZE_M": group}, num_warps=warps, num_stages=stages)


_SHRINK_DECODE = [_config(16, bn, bk, s, 4, 3) for bn in (32, 64) for bk in (128, 256)
                  for s in (4, 8, 16)]
# BLOCK_N 16 puts 256 programs on m = 4096: enough for 132 SMs, where 32 leaves a part idle.
_EXPAND_DECODE = [_config(16, bn, bk, 1, w, st) for bn in (16, 32, 64, 128) for bk in (64, 128)
                  for w, st in ((4, 2), (4, 3))]
_PREFILL = [_config(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in (
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4))]
_tuned_kernels: dict[str, object] = {}


def candidates(regime: str) -> list[dict]:
    """The tile configs the autotuner (and benchmarks/tune_lowrank.py) choose among."""
    configs = {"shrink": _SHRINK_DECODE, "shrink_deterministic": _EXPAND_DECODE,
               "expand": _EXPAND_DECODE, "prefill": _PREFILL}[regime]
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(regime: str, a, b, c, bias, split_default: int, config: dict | None = None):
    """One kernel launch; `config` forces a tile config (the tuning script's candidates)."""
    M, K = a.shape
    N = b.shape[0]
    ieee = a.dtype == torch.float32 and b.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (a, b, c, bias if bias is not None else c, M, N, K, lowrank_configs.token_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    flags = {"HAS_BIAS": bias is not None, "IEEE": ieee}
    if _interpreting() or not a.is_cuda:
        meta = (lowrank_configs.split_meta(config)[0] if config is not None else
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=4, SPLIT_K=split_default))
        _matmul_nt_kernel[grid(meta)](*args, **flags, **meta)
        return
    cfg = config if config is not None else _config_for(regime, M, N, K, a.device, b.dtype)
    if cfg is not None:
        meta, launch = lowrank_configs.split_meta(cfg)
        _matmul_nt_kernel[grid(meta)](*args, **flags, **meta, **launch)
        return
    if regime not in _tuned_kernels:
        configs = {"shrink": _SHRINK_DECODE, "shrink_deterministic": _EXPAND_DECODE,
                   "expand": _EXPAND_DECODE, "prefill": _PREFILL}[regime]
        _tuned_kernels[regime] = triton.autotune(
            configs, key=["M_BUCKET", "N", "K"], reset_to_zero=["c_ptr"] if regime == "shrink" else None,
            **_persist_results(),
        )(_matmul_nt_kernel)
    _tuned_kernels[regime][grid](*args, **flags)


def _persist_results() -> dict:
    """Keep autotuning results in Triton's cache directory across processes (Triton ≥ 3.3)."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@functools.lru_cache(maxsize=None)
def _table_of(device_index: int) -> dict:
    return lowrank_configs.load_table(lowrank_configs.table_path(torch.cuda.get_device_name(device_index)))


def _config_for(regime: str, M: int, N: int, K: int, device, dtype) -> dict | None:
    """The tuned table's config, else None (autotune) — or the default inside graph capture."""
    table = _table_of(device.index if device.index is not None else torch.cuda.current_device())
    cfg = lowrank_configs.lookup(table, regime, M, N, K, dtype)
    if cfg is None and torch.cuda.is_current_stream_capturing():
        tuner = _tuned_kernels.get(regime)
        key_known = tuner is not None and any(  # Triton appends the arguments' dtypes to its keys
            key[:3] == (lowrank_configs.token_bucket(M), N, K) and str(dtype) in key[3:] for key in tuner.cache)
        if not key_known:  # benchmarking cannot run while a graph is captured
            cfg = lowrank_configs.DEFAULTS[regime]
    return cfg


def _check(x, U, V, bias):
    if x.dtype not in _DTYPES:
        raise TypeError(f"lowrank_linear supports fp16, bf16 and fp32 inputs; got {x.dtype}")
    if U.dtype != x.dtype or V.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, U, V and bias must share one dtype; got {x.dtype}, {U.dtype}, {V.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if V.dim() != 2 or U.dim() != 2 or U.shape[1] != V.shape[0]:
        raise ValueError(f"need U (m, k) and V (k, n); got U {tuple(U.shape)}, V {tuple(V.shape)}")
    if x.shape[-1] != V.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but V expects {V.shape[1]}")
    if bias is not None and bias.shape != (U.shape[0],):
        raise ValueError(f"bias must have shape ({U.shape[0]},); got {tuple(bias.shape)}")
    if not (x.device == U.device == V.device) or (bias is not None and bias.device != x.device):
        raise ValueError(f"x, U, V and bias must be on one device; got {x.device}, {U.device}, {V.device}"
                         f"{'' if bias is None else ', ' + str(bias.device)}")


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias=None) -> torch.Tensor:
    """Fused y = U (V x) + b; see the module docstring for the two regimes.

    Args:
        x: (..., n) fp16/bf16/fp32; leading dims are flattened (non-contiguous x is copied once
            by reshape; any 2-D strides are used as they are).
        U: (m, k), V: (k, n), bias: (m,) or None, all in x's dtype; strided factors are fine.
    Returns:
        (..., m) in x's dtype.
    """
    _check(x, U, V, bias)
    if bias is not None:
        bias = bias.contiguous()  # the epilogue reads bias[n] at unit stride (m elements: cheap)
    with _on_device(x.device):
        return _lowrank_linear(x, U, V, bias)


def _on_device(device):
    """Triton launches on the current CUDA device: make it x's (models spread over GPUs)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _lowrank_linear(x, U, V, bias):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T, (m, k) = x2.shape[0], U.shape
    y = torch.empty(T, m, device=x.device, dtype=x.dtype)
    if T == 0:
        return y.reshape(*lead, m)
    if T <= DECODE_MAX_TOKENS:
        t = torch.zeros(T, k, device=x.device, dtype=torch.float32)
        if torch.are_deterministic_algorithms_enabled():  # no atomics: bit-reproducible
            _launch("shrink_deterministic", x2, V, t, None, split_default=1)
        else:
            _launch("shrink", x2, V, t, None, split_default=3)
        _launch("expand", t, U, y, bias, split_default=1)
    else:
        t = torch.empty(T, k, device=x.device, dtype=x.dtype)
        _launch("prefill", x2, V, t, None, split_default=1)
        _launch("prefill", t, U, y, bias, split_default=1)
    return y.reshape(*lead, m)
