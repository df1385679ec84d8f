"""The GPU suite on the CPU: its dry run as the GPU machine would start it (no git on PATH), a
benchmark killed mid-run keeping its rows, a step killed at its limit keeping its output, and
the decode benchmark passing its KV cache under the name the model takes (issues 10, 23)."""
import csv
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)


def path_without_git(tmp_path) -> str:
    """A PATH with python and bash but no git (the GPU image may have none)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "bash").symlink_to("/bin/bash")
    path = os.pathsep.join([str(tools), os.path.dirname(sys.executable)])
    assert subprocess.run(["bash", "-c", "command -v git"], env={"PATH": path}).returncode != 0
    return path


def test_gpu_suite_dry_run_without_git(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "SVDKERN_COMMIT"}
    env["PATH"] = path_without_git(tmp_path)
    done = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_suite.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    summary = (out / "gpu_suite.md").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.md", "gpu_suite.tar.gz"]  # the device returns 8
    table = summary.split("| step |", 1)[1].split("\n\n", 1)[0]  # the steps' table, not their output
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == ["build (sm_90 only, in the background)", "environment",
                     "bench: fused low-rank linear, ratio 0.4, T 1/16/2048", "bench: decode step under CUDA graphs",
                     "extension loads (waits for the build)", "bench: Gram and whitening", "GPU tests",
                     "tune kernel configs, ratio 0.4", "bench: SVD-LLM on 2 LLaMA-7B layers per Gram path",
                     "sweep: fused low-rank linear, ratios 0.2 and 0.6", "bench: engine memory at LLaMA-7B shapes",
                     "bench: LLaMA-7B/70B memory and time estimate from streamed 7B layers"]
    assert all((" | ok | " in row) or ("listed (needs a GPU)" in row) for row in rows), summary
    noted = os.path.join(REPO, ".svdkern_commit")
    commit = open(noted).read().strip() if os.path.isfile(noted) else "unknown"
    assert f"commit {commit}," in summary and "git: absent" in summary
    assert "decode step: needs transformers >= 5.17" in summary
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        packed = {name.split("/", 1)[-1]: tar.getmember(name).size for name in tar.getnames()}
    for table in ("lowrank_cpu_dry_run.md", "lowrank_cpu_dry_run.csv", "lowrank_sweep_cpu_dry_run.csv",
                  "decode_step_cpu_dry_run.md", "stats_cpu_dry_run.md", "lowrank_cpu_dry_run.json",
                  "compress_7b_cpu_dry_run.md", "engine_memory_scale32_cpu.md", "scale_estimate_dry_run.md",
                  "gpu_suite.md"):
        assert packed.get(table, 0) > 0, table
    logs = [name for name in packed if name.startswith("logs/") and name.endswith(".log")]
    assert len(logs) == sum(" | ok | " in row for row in rows)  # every step that ran left its whole output


def test_a_killed_benchmark_keeps_the_rows_it_measured(tmp_path):
    """Killed mid-run, as the suite kills a step at its limit: the rows already measured stay,
    in the csv and the md alike."""
    tokens = list(range(1, 13))
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "bench_lowrank.py"), "--dry-run", "--out",
                             str(tmp_path), "--tokens", ",".join(map(str, tokens))],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    csv_path = tmp_path / "lowrank_cpu_dry_run.csv"
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a timed assertion
        while not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no row was written"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) < 2 * len(tokens)
    assert [int(r["T"]) for r in rows] == (tokens + tokens)[:len(rows)]  # raw rank, then aligned
    assert all(float(r["fused_ms"]) > 0 for r in rows)
    md = (tmp_path / "lowrank_cpu_dry_run.md").read_text().splitlines()
    assert len([line for line in md if line.startswith("| 96 | 80 |")]) == len(rows)


def test_rows_reach_the_md_before_the_csv_and_stay_one_line(tmp_path, monkeypatch):
    """Whoever sees a row in the csv (the killed-benchmark test waits on it) finds it in the md;
    a multi-line error with pipes (a CUDA capture's) stays one cell of one table line."""
    import _harness

    written = []
    append = _harness.Rows._append
    monkeypatch.setattr(_harness.Rows, "_append",
                        staticmethod(lambda path, text: written.append(path[-3:]) or append(path, text)))
    meta = {"gpu": "cpu dry run", "date": "today", "commit": "x", "torch": "t", "triton": "t"}
    rows = _harness.Rows(str(tmp_path), "t", meta, "title")
    rows.add({**meta, "a": 1, "error": None})
    rows.add({**meta, "a": 2, "error": "RuntimeError: capture failed\n  at | line 2"})
    assert written == [".md", "csv"] * 3  # the column lines, then each row
    md = (tmp_path / "t_cpu_dry_run.md").read_text().splitlines()
    assert md[-1] == "| 2 | RuntimeError: capture failed at \\| line 2 |"
    with open(tmp_path / "t_cpu_dry_run.csv") as f:
        assert list(csv.DictReader(f))[-1]["error"] == "RuntimeError: capture failed\n  at | line 2"


@pytest.mark.parametrize("cut_ok,expected", [(False, "FAILED (timed out after 2 s)"),
                                             (True, "cut at limit (rows kept)")])
def test_the_suite_kills_a_step_at_its_limit_and_keeps_its_output(tmp_path, cut_ok, expected):
    """A step past its limit is killed with its output kept; one expected to be cut (cut_ok) is
    not counted as a failure, so a normal run of the suite exits 0."""
    import gpu_suite

    log = tmp_path / "step.log"
    step = {"cmd": [sys.executable, "-c", "print('row 1', flush=True); import time; time.sleep(60)"], "cut_ok": cut_ok}
    status = gpu_suite.run_step(step, dict(os.environ), limit=2, log=str(log))
    assert status == expected
    assert log.read_text().splitlines() == ["row 1"]
    assert gpu_suite.failed([{"status": "ok"}, {"status": status}]) == (not cut_ok)


def test_commit_prefers_the_variable_then_git_then_the_file(tmp_path, monkeypatch):
    """A .svdkern_commit left from an earlier run must not beat git."""
    import _harness

    (tmp_path / ".svdkern_commit").write_text("stale11\n")
    monkeypatch.setenv("SVDKERN_COMMIT", "fromenv")
    monkeypatch.setattr(_harness.shutil, "which", lambda name: "/usr/bin/git")
    monkeypatch.setattr(_harness.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "gitsha1\n", ""))
    assert _harness.commit(str(tmp_path)) == "fromenv"
    monkeypatch.delenv("SVDKERN_COMMIT")
    assert _harness.commit(str(tmp_path)) == "gitsha1"
    monkeypatch.setattr(_harness.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "no repo"))
    assert _harness.commit(str(tmp_path)) == "stale11"  # git present, but not a repository
    monkeypatch.setattr(_harness.shutil, "which", lambda name: None)
    assert _harness.commit(str(tmp_path)) == "stale11"
    assert _harness.commit(str(tmp_path / "elsewhere")) == "unknown"


def test_partial_engine_and_estimate_tables_keep_what_was_measured():
    """Rewritten after every measurement, the tables must render from what has been measured."""
    from types import SimpleNamespace

    import bench_engine
    import estimate_scale

    args = SimpleNamespace(scale=32, layers=1, nsamples=4, seqlen=8, calib_tokens=1024, link_gbs=100.0)
    run = {"layers": 1, "seconds": 1.5, "stages": {"solves": 0.5}, "peak_host": 2**20, "peak_device": None}
    lines = estimate_scale.table({1: run}, args, 32, "cpu")
    assert any(line.startswith("| 1 | 1.5 |") for line in lines) and "did not finish" in lines[-1]
    child = {"peak_bytes_above_model": 2**20, "full_forwards": 2, "early_exits": 0, "early_exit_equivalents": 0.0,
             "seconds": 1.0}
    lines = bench_engine.table([("svd-llm", child, dict(child, full_forwards=4))], args, "cpu")
    assert sum(line.startswith("| svd-llm |") for line in lines) == 1


def test_decode_passes_the_cache_under_the_forwards_name(monkeypatch):
    """transformers 5.17 takes past_key_values=, 5.25 cache=; either swallows the other in
    **kwargs, so a wrong name would run every step without its context."""
    import bench_decode

    def new(input_ids=None, cache=None, **kwargs): ...
    def old(input_ids=None, past_key_values=None, **kwargs): ...
    def neither(input_ids=None, **kwargs): ...

    assert bench_decode.cache_kwarg(new) == "cache"
    assert bench_decode.cache_kwarg(old) == "past_key_values"
    with pytest.raises(TypeError, match="neither"):
        bench_decode.cache_kwarg(neither)
    model = bench_decode.build(1, "cpu", torch.float32, dry_run=True)
    graph, eager, error = bench_decode.step_ms(model, batch=1, prompt=6, graphs=False)  # the name this version takes
    assert graph is None and eager > 0 and error is None
    # a name the forward swallows (as 5.17 swallows cache=; 5.25 still maps past_key_values= on)
    monkeypatch.setattr(bench_decode, "cache_kwarg", lambda forward: "kv_cache")
    with pytest.raises(RuntimeError, match="did not reach the KV cache.*ignored kv_cache="):
        bench_decode.step_ms(model, batch=1, prompt=6, graphs=False)


def test_decode_keeps_the_eager_time_when_capture_fails(monkeypatch):
    import bench_decode

    class FailingGraph:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors | later")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    model = bench_decode.build(1, "cpu", torch.float32, dry_run=True)
    graph, eager, error = bench_decode.step_ms(model, batch=1, prompt=6, graphs=True)
    assert graph is None and eager > 0
    assert error.startswith("capture failed: RuntimeError: operation not permitted")


def test_decode_positions_advance_on_the_device_for_a_forward_that_takes_them():
    """HF's static-cache recipe where the forward takes cache_position (5.17 and 5.25 do not):
    device tensors from the prompt's length on, advanced in place by every step."""
    import bench_decode

    model = bench_decode.build(1, "cpu", torch.float32, dry_run=True)
    original, name, seen = model.model.forward, bench_decode.cache_kwarg(model.model.forward), []
    assert bench_decode.decode_positions(original, 2, 6, "cpu") == {}

    def older(input_ids=None, past_key_values=None, cache_position=None, position_ids=None, **kwargs):
        if cache_position is not None:
            seen.append((cache_position.tolist(), position_ids.tolist()))
        return original(input_ids=input_ids, position_ids=position_ids, **{name: past_key_values}, **kwargs)

    model.model.forward = older
    bench_decode.step_ms(model, batch=2, prompt=6, graphs=False)
    steps = bench_decode.WARMUP + 1  # warm-up and one timed eager step on the CPU
    assert seen == [([6 + i], [[6 + i], [6 + i]]) for i in range(steps)]
