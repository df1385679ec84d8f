"""GPU timing harness shared by the kernel benchmarks (STYLE.md §13).

Times with triton.testing.do_bench over rotating input copies (cold L2: the set of copies is
larger than L2), reports medians, and computes roofline floors from KERNELS.md §1 constants.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess

import sys

import torch

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter is chosen at import
    os.environ["TRITON_INTERPRET"] = "1"

H100 = {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12}
L2_BYTES = 50 * 2**20


def require_cuda(script: str, dry_run: bool = False) -> None:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit(f"{script} measures GPU kernels and needs a CUDA device; none is visible "
                         "(--dry-run runs it on the CPU with tiny shapes).")


def on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()


def bench_parser(doc: str):
    """The GPU benchmarks' shared options: --dry-run and --out."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return ap


def bench_device(args, script: str) -> str:
    """'cuda', or 'cpu' for a dry run; refuses a real run without a GPU."""
    require_cuda(script, args.dry_run)
    return dry_run_env(args.dry_run)


def dry_run_env(dry_run: bool) -> str:
    """The device to measure on; a dry run is the CPU with the Triton interpreter."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    return "cuda"


def rotating(make, bytes_each: int, min_total: int = 5 * L2_BYTES, cap: int = 64):
    """Enough independent copies of the inputs to defeat L2 between timed calls."""
    count = max(2, min(cap, -(-min_total // max(bytes_each, 1))))
    return [make() for _ in range(count)]


def time_ms(fn, inputs) -> float:
    """Median ms of fn(*inputs[i]) cycling over the rotating copies (triton's do_bench).

    On the CPU (dry runs) one timed call per copy: the numbers only show the script runs.
    """
    import triton

    if on_cpu():
        import time

        t0 = time.perf_counter()
        for args in inputs:
            fn(*args)
        return (time.perf_counter() - t0) * 1e3 / len(inputs)
    state = {"i": 0}

    def call():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(*args)

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")


def graph_ms(fn, inputs) -> float | None:
    """ms per call when the calls over all rotating copies replay as one CUDA graph.

    Launch overhead is gone, so this is the kernels' own time (what a serving engine that
    captures decode steps sees). None on the CPU.
    """
    if on_cpu():
        return None
    import triton

    for args in inputs:  # compile and autotune outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") / len(inputs)


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth (bytes/s, read + write counted)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    import triton

    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * n / (ms * 1e-3)


def header() -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    return {"gpu": gpu, "date": datetime.date.today().isoformat(), "commit": sha,
            "torch": torch.__version__, "triton": triton.__version__}


def results_path(out_dir: str | None, stem: str, gpu: str, ext: str) -> str:
    """results/<stem>_<GPU name>.<ext>, or under out_dir (dry runs write to a scratch folder)."""
    folder = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return os.path.join(folder, f"{stem}_{gpu.replace(' ', '_').replace('(', '').replace(')', '')}.{ext}")


def write_markdown(path: str, title: str, meta: dict, rows: list[dict], notes: str = "") -> None:
    """A markdown table of the rows under a header naming device, date and commit."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = [c for c in rows[0] if c not in meta]
    lines = [f"# {title}", "", f"Measured on {meta['gpu']}, {meta['date']}, commit {meta['commit']}, "
             f"torch {meta['torch']}, triton {meta['triton']}.", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
