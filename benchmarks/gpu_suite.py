"""The whole GPU check in one run: build, GPU tests, tuning, every GPU benchmark, the tables.

    python benchmarks/gpu_suite.py --out DIR [--budget-s 470]   # on the GPU machine
    python benchmarks/gpu_suite.py --dry-run --out DIR          # anywhere: lists and smoke-runs

Made for a bare machine with a CUDA PyTorch, Triton, nvcc and pytest and no network: the package
is installed with `--no-build-isolation --no-deps` (nothing is fetched), the extension is built
for sm_90 only, and what such a machine may lack (gguf, the bundled SmolLM2) is not needed.
Each step runs in its own process with a time limit; a failing step is recorded and the suite
goes on; a step that no longer fits the budget is skipped. After every step the summary
(DIR/gpu_suite.md: device, date, commit, each step's status, seconds and last output lines) is
rewritten, so a run cut short still leaves its results. Benchmarks write their tables to DIR.

--dry-run lists every step and runs, on the CPU, what keeps the suite from rotting: each
benchmark's and the tuner's own --dry-run (tiny shapes, Triton interpreter) and the collection of
the GPU tests; the build is only listed. tests/test_gpu_suite.py runs it in CI.
"""
import argparse
import datetime
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GPU_TESTS = ["tests/test_cuda_ext.py", "tests/test_lowrank_triton.py", "tests/test_ops.py"]


def steps(out: str, dry_run: bool) -> list[dict]:
    """name, command, time limit (s), whether a dry run executes it."""
    py = sys.executable
    bench = lambda script, *extra: [py, os.path.join(HERE, script), "--out", out, *extra,  # noqa: E731
                                    *(["--dry-run"] if dry_run else [])]
    return [
        {"name": "environment", "limit": 60, "dry": True, "cmd": [py, "-c", (
            "import torch, triton, subprocess; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
            "'triton', triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() "
            "else 'no GPU'); print(subprocess.run(['nvcc', '--version'], capture_output=True, text=True)"
            ".stdout.strip().splitlines()[-1:] or 'no nvcc')")]},
        {"name": "build (sm_90 only)", "limit": 300, "dry": False,
         "env": {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 4)},
         "cmd": ["bash", "-c", f"{py} -m pip install --no-build-isolation --no-deps --no-index -e {REPO} "
                 f"|| {py} setup.py build_ext --inplace"]},  # the latter if pip lacks a build backend
        {"name": "extension loads", "limit": 60, "dry": False, "cmd": [py, "-c", (
            "import svdkern; from svdkern.backends.cuda_ext import load_error; "
            "assert svdkern.has_cuda_ext(), load_error(); print('svdkern._C loaded')")]},
        {"name": "GPU tests", "limit": 300, "dry": True,
         "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS,
                 *(["--collect-only"] if dry_run else ["--junitxml", os.path.join(out, "gpu_tests.xml")])]},
        {"name": "tune kernel configs", "limit": 180, "dry": True, "cmd": bench("tune_lowrank.py")},
        {"name": "bench: fused low-rank linear", "limit": 180, "dry": True, "cmd": bench("bench_lowrank.py")},
        {"name": "bench: decode step under CUDA graphs", "limit": 150, "dry": True, "cmd": bench("bench_decode.py")},
        {"name": "bench: Gram and whitening", "limit": 120, "dry": True, "cmd": bench("bench_stats.py")},
        {"name": "bench: SVD-LLM on 2 LLaMA-7B layers per Gram path", "limit": 150, "dry": True,
         "cmd": bench("bench_compress_7b.py", "--nsamples", "32", "--layers", "2")},
        {"name": "bench: engine memory at LLaMA-7B shapes", "limit": 240, "dry": True,
         "cmd": bench("bench_engine.py", *([] if dry_run else ["--scale", "1", "--layers", "1", "--nsamples", "4",
                                                                "--methods", "svd-llm,ep-svd-llm,erc-svd"]))},
        {"name": "bench: LLaMA-7B/70B memory and time estimate from streamed 7B layers", "limit": 240, "dry": True,
         "cmd": bench("estimate_scale.py", *([] if dry_run else ["--scale", "1", "--layers", "1", "--nsamples", "16"]))},
    ]


def run_step(cmd: list[str], env: dict, limit: float) -> tuple[str, str]:
    """(status, output) of one step; past its limit the step's whole process group is killed
    (benchmarks start children of their own, which would hold the GPU into the next step)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        return ("ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"), output
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild in a session of its own holds the pipe
            output = ""
        return f"FAILED (timed out after {limit:.0f} s)", output
    except BaseException:  # the suite itself is stopped: its step's processes go with it
        _kill_group(proc)
        raise


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return done.stdout.strip() or "unknown"


def write_summary(path: str, header: list[str], results: list[dict]) -> None:
    lines = header + ["", "| step | status | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | `{' '.join(r['cmd'][-6:])}` |" for r in results]
    for r in results:
        if r.get("tail"):
            lines += ["", f"## {r['name']} ({r['status']})", "", "```", r["tail"], "```"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the tables and the summary (e.g. $OUT)")
    ap.add_argument("--budget-s", type=float, default=470, help="stop starting steps after this long")
    ap.add_argument("--dry-run", action="store_true", help="list every step; smoke-run them on the CPU")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    started = time.monotonic()
    header = [f"# GPU suite{' (dry run)' if args.dry_run else ''}", "",
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, "
              f"budget {args.budget_s:.0f} s."]
    results, failed = [], 0
    summary = os.path.join(args.out, "gpu_suite.md")
    for step in steps(args.out, args.dry_run):
        print(f"== {step['name']}: {' '.join(step['cmd'])}", flush=True)
        record = {"name": step["name"], "cmd": step["cmd"], "seconds": 0.0}
        left = args.budget_s - (time.monotonic() - started)
        if args.dry_run and not step["dry"]:
            record["status"] = "listed (needs a GPU)"
        elif left < 20:
            record["status"] = "skipped: out of budget"
        else:
            t0 = time.monotonic()
            record["status"], output = run_step(step["cmd"], {**env, **step.get("env", {})},
                                                min(step["limit"], left))
            record["seconds"] = time.monotonic() - t0
            record["tail"] = "\n".join(output.strip().splitlines()[-15:])
            failed += record["status"] != "ok"
        print(f"   {record['status']} ({record['seconds']:.1f} s)", flush=True)
        results.append(record)
        write_summary(summary, header, results)
    print(f"summary: {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
