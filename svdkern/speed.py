"""`svdkern bench`: prefill and decode speed and peak memory of a model on this device.

Timed with warm-up and repeats (the median is reported). Decode runs HF `generate` with the KV
cache, greedy, a fixed number of new tokens: what a user of the model sees, Python overhead
included (benchmarks/bench_decode.py isolates the kernels under CUDA graphs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .host import peak_rss, reset_peak_rss


@dataclass
class Speed:
    model: str
    device: str
    prompt_tokens: int
    new_tokens: int
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ms_per_token: float
    peak_memory_gib: float
    memory_kind: str
    parameters: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(model, name: str, prompt_tokens: int = 128, new_tokens: int = 32, batch: int = 1,
            repeats: int = 3, warmup: int = 1) -> Speed:
    """Median prefill and decode throughput of `model` at these sizes, and its peak memory."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=model.generation_config.pad_token_id or 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()

    if new_tokens < 2:
        raise ValueError(f"decode speed needs at least 2 new tokens; got {new_tokens}")

    def prefill():  # the prompt and the first token, as generate does it
        model.generate(ids, **dict(kwargs, max_new_tokens=1, min_new_tokens=1))

    def decode():
        model.generate(ids, **kwargs)

    for _ in range(warmup):
        prefill()
        decode()
    prefill_s = _median_s(prefill, device, repeats)
    generate_s = _median_s(decode, device, repeats)
    # generate(N) = the prefill above + N − 1 decode steps
    if generate_s <= prefill_s:
        raise RuntimeError(f"generating {new_tokens} tokens took no longer than 1 ({generate_s:.3f} s vs "
                           f"{prefill_s:.3f} s): too noisy to time decode; raise --new-tokens or --repeats")
    decode_s = (generate_s - prefill_s) / (new_tokens - 1)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "CUDA memory allocated (peak)"
    else:
        peak, kind = peak_rss(), "process RSS (peak)"
    return Speed(model=name, device=str(device), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                 batch=batch, prefill_tokens_per_s=batch * prompt_tokens / prefill_s,
                 decode_tokens_per_s=batch / decode_s, ms_per_token=decode_s * 1e3,
                 peak_memory_gib=peak / 2**30, memory_kind=kind,
                 parameters=sum(p.numel() for p in model.parameters()))


def table(rows: list[Speed]) -> str:
    head = "| model | prefill tok/s | decode tok/s | ms/token | peak GiB | parameters |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.prefill_tokens_per_s:,.0f} | {r.decode_tokens_per_s:,.1f} | "
                     f"{r.ms_per_token:.1f} | {r.peak_memory_gib:.2f} | {r.parameters / 1e6:.1f} M |")
    if len(rows) == 2:
        a, b = rows
        lines.append(f"\n{b.model} vs {a.model}: prefill x{b.prefill_tokens_per_s / a.prefill_tokens_per_s:.2f}, "
                     f"decode x{b.decode_tokens_per_s / a.decode_tokens_per_s:.2f} ({rows[0].device}; "
                     f"peak memory: {rows[0].memory_kind} while each model ran)")
    return "\n".join(lines)
