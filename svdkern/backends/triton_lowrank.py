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
workspace and never sync, so they can be captured in CUDA graphs — but capture cannot compile,
autotune or load a kernel, so every launch inside capture must match one already made outside
it (same config and the same integer/pointer specialization Triton compiles for): otherwise
NotWarmedUpError names `svdkern.warm_up`, which runs each layer at the token counts to capture.
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
from .lowrank_configs import NotWarmedUpError

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
_CANDIDATES = {"shrink": _SHRINK_DECODE, "shrink_deterministic": _EXPAND_DECODE,
               "expand": _EXPAND_DECODE, "prefill": _PREFILL}
_tuned_kernels: dict[str, object] = {}
_chosen: dict[tuple, dict] = {}  # (regime, device, bucket, N, K, dtype) -> config from the table or autotuner
_loaded: set[tuple] = set()  # specializations (_specialization) of kernels launched outside capture
_seen: set[tuple] = set()  # exact launch keys (_exact_key) already recorded in _loaded
_SEEN_MAX = 1 << 16  # prefill meets a new exact key per token count: forget them now and then


def candidates(regime: str) -> list[dict]:
    """The tile configs the autotuner (and benchmarks/tune_lowrank.py) choose among."""
    return [_as_dict(c) for c in _CANDIDATES[regime]]


def _as_dict(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _capturing(device: int) -> bool:
    """Whether the current stream is being captured into a CUDA graph (device -1, the CPU, never is)."""
    return device >= 0 and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _interpreter_config(split: int) -> dict:
    """The fixed small tiles run under TRITON_INTERPRET=1 and on the CPU (nothing to tune there)."""
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=4, SPLIT_K=split, num_warps=4, num_stages=1)


def _exact_key(config_items: tuple, args: tuple, flags: dict, device: int) -> tuple:
    """A launch as exactly as needed to tell whether it was seen before: device, config, flags,
    every integer argument, each tensor's dtype and 16-byte alignment. Cheap to build and hash
    (the eager decode path pays it on every launch); _specialization reduces it to what Triton
    compiles for, which only capture and a first sighting need."""
    a, b, c, d = args[:4]
    tensors = (a.dtype, b.dtype, c.dtype, d.dtype, a.data_ptr() % 16 == 0, b.data_ptr() % 16 == 0,
               c.data_ptr() % 16 == 0, d.data_ptr() % 16 == 0)
    return device, config_items, tuple(flags.values()), args[4:], tensors


def _specialization(exact: tuple) -> tuple:
    """What decides which compiled kernel a launch runs: the exact key with each integer reduced
    to how Triton specializes it (being 1, a multiple of 16, past int32). Equal specializations
    run the same binary, so one loaded outside capture may be launched inside it."""
    device, config, flags, ints, tensors = exact
    return device, config, flags, tuple((v == 1, v % 16 == 0, -2**31 <= v < 2**31) for v in ints), tensors


def _record(exact: tuple) -> None:
    """Note a launch made outside capture as loaded (its specialization, for capture to check)."""
    if len(_seen) >= _SEEN_MAX:
        _seen.clear()
    _seen.add(exact)
    _loaded.add(_specialization(exact))


def _not_warmed(regime: str, M: int, N: int, K: int, dtype) -> NotWarmedUpError:
    return NotWarmedUpError(
        f"svdkern: CUDA-graph capture met a low-rank kernel ({regime}, {M} tokens, N={N}, K={K}, "
        f"{dtype}) that was never launched before it, and capture cannot tune, compile or load one. "
        f"Call svdkern.warm_up(model, token_counts=({M},)) before capturing, with every token "
        f"count (batch x tokens per step) the graph will see.")


def _launch(regime: str, a, b, c, bias, split_default: int, config: dict | None = None):
    """One kernel launch; `config` forces a tile config (the tuning script's candidates).

    Inside CUDA-graph capture only a kernel launched before it, at the same config and
    specialization, may run (else NotWarmedUpError); outside it each new launch is recorded.
    """
    M, K = a.shape
    N = b.shape[0]
    ieee = a.dtype == torch.float32 and b.dtype == torch.float32
    bucket = lowrank_configs.token_bucket(M)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (a, b, c, bias if bias is not None else c, M, N, K, bucket,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    flags = {"HAS_BIAS": bias is not None, "IEEE": ieee}
    device = a.get_device()  # -1 on the CPU
    capturing = _capturing(device)  # asked once: a CUDA call on every decode launch
    interpreted = _interpreting() or device < 0
    if config is None:
        config = (_interpreter_config(split_default) if interpreted
                  else _config_for(regime, device, bucket, M, N, K, b.dtype))
    if config is None:  # nothing tuned for this shape in this process: autotune, never in capture
        if capturing:
            raise _not_warmed(regime, M, N, K, b.dtype)
        tuner = _autotuner(regime)
        tuner[grid](*args, **flags)
        config = _as_dict(tuner.best_config)
        _chosen[regime, device, bucket, N, K, b.dtype] = config
        _record(_exact_key(tuple(config.items()), args, flags, device))
        return
    items = tuple(config.items())
    exact = _exact_key(items, args, flags, device)
    if capturing and _specialization(exact) not in _loaded:
        raise _not_warmed(regime, M, N, K, b.dtype)
    if interpreted:
        _matmul_nt_kernel[grid(config)](*args, **flags, **lowrank_configs.split_meta(config)[0])
    else:
        _matmul_nt_kernel[grid(config)](*args, **flags, **_as_autotuned(items))
    if not capturing and exact not in _seen:
        _record(exact)


@functools.lru_cache(maxsize=None)
def _as_autotuned(config: tuple) -> dict:
    """A config's launch arguments exactly as the autotuner passes them: Triton keys compiled
    kernels on those options as passed, so the kernel the autotuner compiled is the one reused
    (a different set, e.g. without num_ctas, would compile and load anew, inside capture too)."""
    meta, launch = lowrank_configs.split_meta(dict(config))
    return triton.Config(meta, **launch).all_kwargs()


def _autotuner(regime: str):
    """The regime's autotuned kernel, made on first use (with SVDKERN_AUTOTUNE_MS's timing)."""
    if regime not in _tuned_kernels:
        timing = lowrank_configs.autotune_ms()
        bench = {} if timing is None else {"do_bench": lambda fn, quantiles: triton.testing.do_bench(
            fn, warmup=timing[0], rep=timing[1], quantiles=quantiles)}
        _tuned_kernels[regime] = triton.autotune(
            _CANDIDATES[regime], key=["M_BUCKET", "N", "K"],
            reset_to_zero=["c_ptr"] if regime == "shrink" else None,
            prune_configs_by={"early_config_prune": _covering_tiles}, **bench, **_persist_results(),
        )(_matmul_nt_kernel)
    return _tuned_kernels[regime]


def _covering_tiles(configs, named_args, **kwargs):
    """Drop tiles larger than the smallest candidate that covers a dimension (they only mask more),
    so small shapes time a few configs instead of all. M is taken as its bucket, the tuning key."""
    dims = {"BLOCK_M": named_args["M_BUCKET"], "BLOCK_N": named_args["N"], "BLOCK_K": named_args["K"]}
    for block, size in dims.items():
        tiles = sorted({c.kwargs[block] for c in configs})
        cover = next((t for t in tiles if t >= size), tiles[-1])
        configs = [c for c in configs if c.kwargs[block] <= cover]
    return configs


def _persist_results() -> dict:
    """Keep autotuning results in Triton's cache directory across processes (Triton ≥ 3.3)."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@functools.lru_cache(maxsize=None)
def _table_of(device_index: int) -> dict:
    return lowrank_configs.load_table(lowrank_configs.table_path(torch.cuda.get_device_name(device_index)))


def _config_for(regime: str, device: int, bucket: int, M: int, N: int, K: int, dtype) -> dict | None:
    """This process's config for the shape (remembered from the table or the autotuner), else the
    tuned table's, else None: autotune now, or inside capture, where nothing can be timed, refuse."""
    key = (regime, device, bucket, N, K, dtype)
    cfg = _chosen.get(key)
    if cfg is None:
        cfg = lowrank_configs.lookup(_table_of(device), regime, M, N, K, dtype)
        if cfg is not None:
            _chosen[key] = cfg
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
