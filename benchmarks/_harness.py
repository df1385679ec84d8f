"""GPU timing harness shared by the kernel benchmarks (STYLE.md §13).

Times with triton.testing.do_bench over rotating input copies (cold L2: the set of copies is
larger than L2), reports medians, and computes roofline floors from KERNELS.md §1 constants.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess

import torch

H100 = {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12}
L2_BYTES = 50 * 2**20


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} measures GPU kernels and needs a CUDA device; none is visible.")


def rotating(make, bytes_each: int, min_total: int = 5 * L2_BYTES, cap: int = 64):
    """Enough independent copies of the inputs to defeat L2 between timed calls."""
    count = max(2, min(cap, -(-min_total // max(bytes_each, 1))))
    return [make() for _ in range(count)]


def time_ms(fn, inputs) -> float:
    """Median ms of fn(*inputs[i]) cycling over the rotating copies (triton's do_bench)."""
    import triton

    state = {"i": 0}

    def call():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(*args)

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth (bytes/s, read + write counted)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    import triton

    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * n / (ms * 1e-3)


def header() -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import triton

    return {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": sha,
            "torch": torch.__version__, "triton": triton.__version__}


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
