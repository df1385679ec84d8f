"""GPU timing harness shared by the kernel benchmarks (STYLE.md §13).

Times with triton.testing.do_bench over rotating input copies (cold L2: the set of copies is
larger than L2), reports medians, and computes roofline floors from KERNELS.md §1 constants.
Rows go to their files as each is measured (Rows), so a benchmark killed by its time limit
keeps what it had measured.
"""
from __future__ import annotations

import csv
import datetime
import io
import os
import shutil
import subprocess
import sys

import torch

if "--dry-run" in sys.argv:  # before anything imports triton: the interpreter is chosen at import
    os.environ["TRITON_INTERPRET"] = "1"

H100 = {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12}
L2_BYTES = 50 * 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def commit(repo: str = REPO) -> str:
    """The commit measured: $SVDKERN_COMMIT (the GPU suite sets it for its steps; the way to name
    it on a machine without git), else git where it is installed, else a `.svdkern_commit` file
    at the repository root (a fallback that can go stale, so git beats it), else 'unknown'."""
    if os.environ.get("SVDKERN_COMMIT"):
        return os.environ["SVDKERN_COMMIT"]
    if shutil.which("git") is not None:
        try:
            done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except OSError:
            pass
    noted = os.path.join(repo, ".svdkern_commit")
    if os.path.isfile(noted):
        with open(noted) as f:
            return f.read().strip() or "unknown"
    return "unknown"


def header() -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    return {"gpu": gpu, "date": datetime.date.today().isoformat(), "commit": commit(),
            "torch": torch.__version__, "triton": triton.__version__}


def results_path(out_dir: str | None, stem: str, gpu: str, ext: str) -> str:
    """results/<stem>_<GPU name>.<ext>, or under out_dir (dry runs write to a scratch folder)."""
    folder = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return os.path.join(folder, f"{stem}_{gpu.replace(' ', '_').replace('(', '').replace(')', '')}.{ext}")


def _title_lines(title: str, meta: dict, notes: str) -> list[str]:
    lines = [f"# {title}", "", f"Measured on {meta['gpu']}, {meta['date']}, commit {meta['commit']}, "
             f"torch {meta['torch']}, triton {meta['triton']}.", ""]
    return lines + ([notes, ""] if notes else [])


def _md_cell(value) -> str:
    """A table cell on one line: a multi-line CUDA error would otherwise break the table."""
    return "" if value is None else " ".join(str(value).split()).replace("|", "\\|")


def _md_row(values) -> str:
    return "| " + " | ".join(_md_cell(v) for v in values) + " |"


def write_text(path: str, text: str) -> None:
    """Write a whole file atomically: a temporary name, then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Rows:
    """A benchmark's table, appended to <stem>_<GPU>.csv and .md one row at a time as measured.

    Each row is written and flushed before the next is measured, so a run killed by its time
    limit leaves every row it finished; the md before the csv, so whoever sees a row in the csv
    finds it in the md too. The files are started anew by each run; the md's title and notes
    come first, its column line with the first row.
    """

    def __init__(self, out_dir: str | None, stem: str, meta: dict, title: str, notes: str = ""):
        self.meta, self.cols = meta, None
        self.csv = results_path(out_dir, stem, meta["gpu"], "csv")
        self.md = self.csv[:-4] + ".md"
        write_text(self.md, "\n".join(_title_lines(title, meta, notes)) + "\n")
        write_text(self.csv, "")

    def add(self, row: dict) -> dict:
        if self.cols is None:
            self.cols = list(row)
            shown = [c for c in self.cols if c not in self.meta]
            self._append(self.md, _md_row(shown) + "\n|" + "---|" * len(shown) + "\n")
            self._append(self.csv, ",".join(self.cols) + "\n")
        self._append(self.md, _md_row(row.get(c) for c in self.cols if c not in self.meta) + "\n")
        line = io.StringIO()
        csv.writer(line).writerow([row.get(c) for c in self.cols])
        self._append(self.csv, line.getvalue())
        print({c: v for c, v in row.items() if c not in self.meta}, flush=True)
        return row

    @staticmethod
    def _append(path: str, text: str) -> None:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
