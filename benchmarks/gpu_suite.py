"""The whole GPU check in one call: the key tables first, then the tests, the tuner and wider sweeps.

    python benchmarks/gpu_suite.py --out DIR [--budget-s 510]   # on the GPU machine
    python benchmarks/gpu_suite.py --dry-run --out DIR          # anywhere: lists and smoke-runs

Made for the lent GPU machine: 15 minutes of device time in all (machine start included), at most
10 minutes a command, at most 8 files back, torch 2.11 / Triton 3.6 / transformers 5.17, nvcc,
no network, maybe no git and no gguf. The package is built with `--no-build-isolation --no-deps`
(nothing is fetched) for sm_90 only, in the background while the first benchmarks run (their
processes get SVDKERN_CUDA_EXT=0 so none loads a half-written extension; the steps that need it
wait for it). Name the commit measured in the command, where git is absent:
`SVDKERN_COMMIT=<sha> python benchmarks/gpu_suite.py ...` (<sha> from `git rev-parse --short HEAD`
where git is). Without it: git if present, else a `.svdkern_commit` file at the repository root
(an untracked fallback that goes stale: prefer the variable, delete the file after), else
'unknown'. Autotuning times each config for a few ms (SVDKERN_AUTOTUNE_MS=2,10), not Triton's 25 + 100.

Each step runs in its own process group with a time limit, clipped to what is left of the budget;
a failing step is recorded and the suite goes on; a step that no longer fits is skipped. The
steps the budget is expected to cut (the tuner, SVD-LLM, the sweeps, engine, estimate: marked
cut_ok) report "cut at limit (rows kept)" when stopped, which is not a failure: the suite exits
1 only for a step that failed or a step without cut_ok that ran past its limit. Every
step's whole output goes to logs/; benchmarks append each row to their table as it is measured,
so a step killed at its limit keeps its rows. After every step (and on SIGTERM) everything is
packed into DIR: gpu_suite.md (device, date, commit, each step's status, seconds, estimate and
last output lines) and gpu_suite.tar.gz (the tables, the logs, the junit file, the tuned
config table, the summary). Nothing else is written to DIR: two files, whatever happens.

Plan, with the wall time each step is expected to take on an H100. Each estimate is the step's
CPU dry run (measured 2026-12-07 on 2 shared cores: imports and tiny shapes, so it bounds the
start-up) plus its GPU work, counted as ~0.4 s per Triton compile (a compiled kernel is reused
by every later step through Triton's cache, and so are autotuning results), ~15-25 ms per
autotuned config (2 + 10 ms of timing, L2 flushes), ~0.2 s per do_bench (25 + 100 ms) and
~0.1 s per CUDA-graph capture and replay set:

| step | limit s | H100 s | dry run s | the work |
|---|---|---|---|---|
| build (background) | 300 | 120 | listed | bindings.cpp and 2 .cu files for sm_90 |
| environment | 60 | 15 | 5 | cold imports, nvcc --version |
| fused low-rank, ratio 0.4, T 1/16/2048 | 150 | 100 | 6 | 18 rows (a) |
| decode step under CUDA graphs | 150 | 80 | 14 | 4 stacks x batch 1, 8 (b) |
| extension loads (waits for the build) | 60 + wait | 5 | listed | the build has had ~200 s |
| Gram and whitening | 90 | 40 | 5 | 30 Gram rows, 6 whitening rows (c) |
| GPU tests | 210 | 150 | 7 (collect) | 164 tests (d) |
| tuner, ratio 0.4 | 120 | 90 | 6 | 8 shapes x 132 configs x ~45 ms, ~56 compiles (e) |
| SVD-LLM on 2 LLaMA-7B layers per Gram path | 150 | 60 | 13 | 2 processes, 32 x 2048 tokens |
| sweep: fused low-rank, ratios 0.2 and 0.6 | 240 | 150 | 6 | 72 rows, cut by the budget |
| engine memory at LLaMA-7B shapes | 240 | 120 | 24 | if time is left |
| LLaMA-7B/70B estimate from streamed layers | 240 | 100 | 28 | if time is left |

(a) ~1.5 s of timing a row; 36 new autotune keys (~430 configs, ~10 s); ~140 compiles (~60 s).
(b) Each stack built on the GPU (~4 s); per batch: prefill, warm-up, 23 eager steps, capture,
    52 replays (~1 s); batch 8's new keys (~60 compiles).
(c) Over 32K tokens each, with fp64 references; whitening in fp64 up to n = 11008.
(d) The awkward-shape test's 36 keys (~140 compiles), 14 tiny compressions on the GPU, the
    LLaMA-7B shapes already compiled and autotuned by (a).
(e) 3 (m, n) pairs x up to 3 ranks = 8 distinct shapes; per shape, every candidate at each
    bucket: 3 decode buckets x (12 shrink + 16 expand) + 3 prefill buckets x 2 GEMMs x 8 = 132
    configs, do_bench(5 + 20 ms) each, ~45 ms with its L2 flushes: 1056 x 45 ms ≈ 48 s. Only
    T = 4 is a new specialization after (a) (T = 1, 16 and the prefill buckets are not):
    (12 + 16) configs x 2 rank classes = 56 compiles, ≈ 22 s; start-up ≈ 6 s: ≈ 76 s, est. 90.

The steps through the tuner add to ~480 s of the 510 s budget; what is left goes to SVD-LLM
(kept per row if cut); with the final kill and packing the call ends by ~520 s, inside the
9 minutes planned: run it as
`SVDKERN_COMMIT=<sha> timeout 570 python benchmarks/gpu_suite.py --out $OUT`
(SIGTERM packs what was measured). The whole dry run takes about 2 minutes on 2 CPU cores.

--dry-run lists every step and runs, on the CPU, what keeps the suite from rotting: each
benchmark's and the tuner's own --dry-run (tiny shapes, Triton interpreter), the collection of
the GPU tests and the environment report (which names the transformers the decode step needs);
the build is only listed. tests/test_gpu_suite.py runs it in CI with no git on PATH.
"""
import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

from _harness import commit, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GPU_TESTS = ["tests/test_cuda_ext.py", "tests/test_lowrank_triton.py", "tests/test_ops.py"]
AUTOTUNE_MS = "2,10"


def steps(work: str, dry_run: bool) -> list[dict]:
    """name, command, time limit (s), H100 estimate (s), whether a dry run executes it, whether
    it runs in the background or needs the build, and whether being cut at its limit is expected
    (cut_ok: its rows are kept as measured, and the budget is planned to run out in it)."""
    py = sys.executable
    dry = ["--dry-run"] if dry_run else []
    bench = lambda script, *extra: [py, os.path.join(HERE, script), "--out", work, *extra, *dry]  # noqa: E731
    return [
        {"name": "build (sm_90 only, in the background)", "limit": 300, "est": 120, "dry": False, "background": True,
         "env": {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "4"},  # 3 files; cores left for the benchmarks
         "cmd": ["bash", "-c", f"{py} -m pip install --no-build-isolation --no-deps --no-index -e {REPO} "
                 f"|| {py} setup.py build_ext --inplace"]},  # the latter if pip lacks a build backend
        {"name": "environment", "limit": 60, "est": 15, "dry": True, "cmd": [py, __file__, "--environment"]},
        {"name": "bench: fused low-rank linear, ratio 0.4, T 1/16/2048", "limit": 150, "est": 100, "dry": True,
         "cmd": bench("bench_lowrank.py", "--ratios", "0.4", *([] if dry_run else ["--tokens", "1,16,2048"]))},
        {"name": "bench: decode step under CUDA graphs", "limit": 150, "est": 80, "dry": True,
         "cmd": bench("bench_decode.py")},
        {"name": "extension loads (waits for the build)", "limit": 60, "est": 5, "dry": False, "after_build": True,
         "cmd": [py, "-c", "import svdkern; from svdkern.backends.cuda_ext import load_error; "
                 "assert svdkern.has_cuda_ext(), load_error(); print('svdkern._C loaded')"]},
        {"name": "bench: Gram and whitening", "limit": 90, "est": 40, "dry": True, "after_build": True,
         "cmd": bench("bench_stats.py")},
        {"name": "GPU tests", "limit": 210, "est": 150, "dry": True, "after_build": True,
         "cmd": [py, "-m", "pytest", "-p", "no:cacheprovider", *GPU_TESTS,
                 *(["-q", "--collect-only"] if dry_run else
                   ["-v", "--durations=15", "--junitxml", os.path.join(work, "gpu_tests.xml")])]},
        {"name": "tune kernel configs, ratio 0.4", "limit": 120, "est": 90, "dry": True, "cut_ok": True,
         "cmd": bench("tune_lowrank.py", "--ratios", "0.4")},
        {"name": "bench: SVD-LLM on 2 LLaMA-7B layers per Gram path", "limit": 150, "est": 60, "dry": True,
         "after_build": True, "cut_ok": True,
         "cmd": bench("bench_compress_7b.py", "--nsamples", "32", "--layers", "2")},
        {"name": "sweep: fused low-rank linear, ratios 0.2 and 0.6", "limit": 240, "est": 150, "dry": True,
         "cut_ok": True,
         "cmd": bench("bench_lowrank.py", "--ratios", "0.2,0.6", "--name", "lowrank_sweep")},
        {"name": "bench: engine memory at LLaMA-7B shapes", "limit": 240, "est": 120, "dry": True, "cut_ok": True,
         "cmd": bench("bench_engine.py", *([] if dry_run else ["--scale", "1", "--layers", "1", "--nsamples", "4",
                                                                "--methods", "svd-llm,ep-svd-llm,erc-svd"]))},
        {"name": "bench: LLaMA-7B/70B memory and time estimate from streamed 7B layers", "limit": 240, "est": 100,
         "dry": True, "cut_ok": True,
         "cmd": bench("estimate_scale.py", *([] if dry_run else ["--scale", "1", "--layers", "1", "--nsamples", "16"]))},
    ]


def environment() -> None:
    """What the device has, printed by the suite's environment step (its own process)."""
    import importlib.util

    import torch
    import triton
    from bench_decode import requirement

    print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    nvcc = shutil.which("nvcc")
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
          if nvcc else "no nvcc")
    print("git:", shutil.which("git") or "absent", "| gguf:", "present" if importlib.util.find_spec("gguf")
          else "absent (not needed)", "| commit:", os.environ.get("SVDKERN_COMMIT"))
    print(requirement())


def start(step: dict, env: dict, log: str) -> subprocess.Popen:
    """The step's process, in a group of its own, its whole output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(step["cmd"], cwd=REPO, env={**env, **step.get("env", {})}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, limit: float) -> str:
    """The status of a started step once it ends; past `limit` seconds its whole process group
    is killed (benchmarks start children of their own, which would hold the GPU)."""
    try:
        proc.wait(timeout=max(limit, 0))
        return "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return f"FAILED (timed out after {limit:.0f} s)"
    except BaseException:  # the suite itself is stopped: its step's processes go with it
        kill_group(proc)
        raise


CUT = "cut at limit (rows kept)"


def run_step(step: dict, env: dict, limit: float, log: str) -> str:
    """The step's status; a cut_ok step stopped at its limit is CUT, not a failure."""
    status = finish(start(step, env, log), limit)
    return CUT if step.get("cut_ok") and status.startswith("FAILED (timed out") else status


def failed(results: list[dict]) -> bool:
    """Whether the suite should exit 1: a step failed (CUT and skipped steps are not failures)."""
    return any(r["status"].startswith("FAILED") for r in results)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(log: str, lines: int = 15) -> str:
    with open(log, errors="replace") as f:
        return "\n".join(f.read().strip().splitlines()[-lines:])


def shown(cmd: list[str], work: str) -> str:
    """A step's command as the summary's table shows it: short paths, pipes escaped."""
    text = " ".join(cmd).replace(sys.executable, "python").replace(work, "WORK").replace(REPO + "/", "")
    return text.replace("|", "\\|")


def write_summary(work: str, header: list[str], results: list[dict]) -> str:
    """work/gpu_suite.md: the steps' table, then the last lines of each step's log; returns its text."""
    lines = header + ["", "| step | status | seconds | H100 estimate s | limit s | command |", "|---" * 6 + "|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['est']} | {r['limit']} | "
              f"`{shown(r['cmd'], work)}` |" for r in results]
    for r in results:
        log = os.path.join(work, r["log"])
        if os.path.isfile(log):
            lines += ["", f"## {r['name']} ({r['status']})", "", f"Last lines of {r['log']}:", "",
                      "```", tail(log), "```"]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(work, "gpu_suite.md"), text)
    return text


def pack(work: str, out: str, header: list[str], results: list[dict]) -> None:
    """DIR/gpu_suite.md and DIR/gpu_suite.tar.gz (everything in `work`), each replaced atomically."""
    write_text(os.path.join(out, "gpu_suite.md"), write_summary(work, header, results))
    tmp = os.path.join(out, "gpu_suite.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="gpu_suite")
    os.replace(tmp, os.path.join(out, "gpu_suite.tar.gz"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for gpu_suite.md and gpu_suite.tar.gz (e.g. $OUT)")
    ap.add_argument("--budget-s", type=float, default=510, help="no step runs past this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="list every step; smoke-run them on the CPU")
    ap.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.environment:
        environment()
        return 0
    if not args.out:
        ap.error("--out is required")
    started, sha = time.monotonic(), commit()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SVDKERN_COMMIT=sha, SVDKERN_AUTOTUNE_MS=AUTOTUNE_MS)
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    header = [f"# GPU suite{' (dry run)' if args.dry_run else ''}", "",
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {sha}, "
              f"budget {args.budget_s:.0f} s. Every step's whole output is in gpu_suite.tar.gz (logs/)."]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: pack first
    results, build = [], None
    budget_left = lambda: args.budget_s - (time.monotonic() - started)  # noqa: E731
    work = tempfile.mkdtemp(prefix="gpu_suite-")  # packed into DIR after every step, removed at the end
    os.makedirs(os.path.join(work, "logs"))
    try:
        for i, step in enumerate(steps(work, args.dry_run)):
            print(f"== {step['name']}: {' '.join(step['cmd'])}", flush=True)
            log = os.path.join(work, "logs", f"{i:02d}-{re.sub(r'[^a-z0-9]+', '-', step['name'].lower())[:50]}.log")
            record = {**step, "status": "stopped with the suite", "seconds": 0.0, "log": os.path.relpath(log, work)}
            results.append(record)
            if build and step.get("after_build"):
                wait_for_build(build, budget_left())
            left = budget_left()
            if args.dry_run and not step["dry"]:
                record["status"] = "listed (needs a GPU)"
            elif left < 20:
                record["status"] = "skipped: out of budget"
            elif step.get("background"):
                build = {"record": record, "proc": start(step, env, log), "t0": time.monotonic()}
                record["status"] = "running in the background"
            else:
                t0 = time.monotonic()
                building = build is not None and build["proc"].poll() is None
                step_env = {**env, "SVDKERN_CUDA_EXT": "0"} if building else env
                record["status"] = run_step(step, step_env, min(step["limit"], left), log)
                record["seconds"] = time.monotonic() - t0
            print(f"   {record['status']} ({record['seconds']:.1f} s)", flush=True)
            if build and build["proc"].poll() is not None:
                wait_for_build(build, 0)
            pack(work, args.out, header, results)
    finally:
        if build:
            wait_for_build(build, 0)
        pack(work, args.out, header, results)
        shutil.rmtree(work, ignore_errors=True)
    print(f"summary: {args.out}/gpu_suite.md, everything: {args.out}/gpu_suite.tar.gz")
    return 1 if failed(results) else 0


def wait_for_build(build: dict, budget_left: float) -> None:
    """Wait for the background build (within its own limit and the budget), then record it."""
    record = build["record"]
    if record["status"] != "running in the background":
        return
    elapsed = time.monotonic() - build["t0"]
    status = finish(build["proc"], min(record["limit"] - elapsed, budget_left))
    record["seconds"] = time.monotonic() - build["t0"]
    record["status"] = f"FAILED (stopped after {record['seconds']:.0f} s)" if "timed out" in status else status


if __name__ == "__main__":
    sys.exit(main())
