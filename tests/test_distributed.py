"""Data-parallel calibration with gloo on the CPU: two processes give one process's factors."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import svdkern
from svdkern.nn import LowRankLinear

from conftest import tiny_model

METHODS = ["svd-llm", "sc-svd-llm", "ep-svd-llm", "saes-svd"]


def calibration():
    return torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(1))


def dense_weights(model) -> dict:
    return {n: m.dense_weight().detach().clone() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _worker(rank, world, port, method, family, out, knobs=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import svdkern.pipeline as pipeline

        real_svd, solves = pipeline.svd_of, [0]

        def counted(*args, **kwargs):
            solves[0] += 1
            return real_svd(*args, **kwargs)

        pipeline.svd_of = counted
        model = tiny_model(family, seed=5)
        svdkern.compress(model, method, 0.3, calib=calibration(), batch_size=2, progress=False,
                         log=lambda *_: None, **(knobs or {}))
        torch.save(dense_weights(model), os.path.join(out, f"rank{rank}.pt"))
        report = model._svdkern_report
        torch.save({"solves": solves[0], "allocation": report.allocation, "plc": report.plc,
                    **{f: getattr(report, f) for f in pipeline.REPORT_FIELDS}},
                   os.path.join(out, f"report{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,family,knobs", [(m, "llama", {}) for m in METHODS] + [
    ("ep-svd-llm", "opt", {}),
    ("erc-svd", "llama", dict(plc_samples=6)),                       # PLC's search on the first batches
    ("best", "llama", dict(sensitivity_samples=6)),  # Fisher-weighted allocation, block refinement
    ("svd-llm", "llama", dict(layer_policy="v2")),
    ("ep-svd-llm", "llama", dict(beta_grid=(0.0, 0.5, 1.0), holdout_batches=2))])  # held-out β
def test_two_gloo_processes_give_one_process_factors(method, family, knobs, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), method, family, str(tmp_path), knobs), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (expected, report), reordered = one_process_run(family, method, 2, **knobs), one_process(family, method, 4, **knobs)
    assert set(ranks[0]) == set(expected)
    for name, W in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank solved the same thing
        err = float((ranks[0][name] - W).norm() / W.norm())
        # only the order of the sums differs: as much as another micro-batch size moves one process
        # (EP/SAES's W·Δ·P⁻ᵀ amplifies rounding where a tiny model's Gram is ill-conditioned)
        order = float((reordered[name] - W).norm() / W.norm())
        assert err <= 2 * order + 1e-4, (name, err, order)
    # each matrix solved once, by one rank, and every rank's report complete (svd_of: once per
    # matrix in one process; SAES's β needs a second SVD of each)
    reports = [torch.load(tmp_path / f"report{r}.pt") for r in range(2)]
    per_matrix = 2 if method == "saes-svd" else 1
    solves = [r.pop("solves") for r in reports]
    assert sum(solves) == per_matrix * len(expected) and max(solves) <= per_matrix * (len(expected) // 2 + 2)
    assert reports[0] == reports[1] and set(reports[0]["ranks"]) == {
        n.split("layers.", 1)[1] for n in expected}
    # the same choices as one process: ranks (searched, measured), PLC's layer count, β per matrix
    assert reports[0]["allocation"] == report.allocation and reports[0]["ranks"] == report.ranks
    if report.plc:
        assert reports[0]["plc"]["layers"] == report.plc["layers"]
        assert reports[0]["plc"]["search_windows"] == report.plc["search_windows"]
    if knobs.get("beta_grid"):
        assert reports[0]["betas"] == report.betas
    assert {k: v["steps"] for k, v in reports[0]["refine"].items()} == {
        k: v["steps"] for k, v in report.refine.items()}  # refinement kept the same step count


def one_process(family, method, batch_size, **knobs) -> dict:
    return one_process_run(family, method, batch_size, **knobs)[0]


def one_process_run(family, method, batch_size, **knobs):
    """(dense weights of the factors, report) of one process's run."""
    model = tiny_model(family, seed=5)
    svdkern.compress(model, method, 0.3, calib=calibration(), batch_size=batch_size, progress=False,
                     log=lambda *_: None, **knobs)
    return dense_weights(model), model._svdkern_report


def _refusing_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        svdkern.compress(tiny_model("llama"), "erc-svd", 0.3, calib=calibration(), batch_size=2,
                         checkpoint_dir=os.path.join(out, f"ck{rank}"), progress=False, log=lambda *_: None)
    except ValueError as exc:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(str(exc))
    finally:
        torch.distributed.destroy_process_group()


def test_what_is_not_data_parallel_yet_is_refused_by_name(tmp_path):
    mp.spawn(_refusing_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "checkpoint_dir (resume)" in text and "Run it in one process" in text


def test_torchrun_runs_the_command_line_on_two_ranks(tmp_path):
    """`torchrun --nproc-per-node 2 -m svdkern compress …` (gloo on the CPU) saves one process's factors."""
    import subprocess
    import sys

    from conftest import save_tiny_with_real_tokenizer

    save_tiny_with_real_tokenizer(tmp_path / "tiny")
    common = ["compress", "--model", str(tmp_path / "tiny"), "--method", "svd-llm", "--ratio", "0.3",
              "--nsamples", "8", "--seqlen", "64", "--batch-size", "2", "--no-eval", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "svdkern", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # rank 0 reports and saves
    one = subprocess.run([sys.executable, "-m", "svdkern", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = dense_weights(svdkern.load(tmp_path / "two")), dense_weights(svdkern.load(tmp_path / "one"))
    assert set(a) == set(b)
    for name in a:
        assert float((a[name] - b[name]).norm() / b[name].norm()) < 1e-4, name


def smollm2_windows(tokenizer):
    from svdkern.data import load_text, token_windows, tokenize

    return token_windows(tokenize(tokenizer, load_text("wikitext2", "calibration")), 16, 128, 0)


def smollm2_factors(method, batch_size) -> dict:
    model, tokenizer = svdkern.load_model("smollm2")
    svdkern.compress(model, method, 0.2, calib=smollm2_windows(tokenizer), batch_size=batch_size,
                     svd_dtype=torch.float32, progress=False, log=lambda *_: None)  # fp32 SVDs: CI time
    return dense_weights(model)


def _smollm2_worker(rank, world, port, method, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        factors = smollm2_factors(method, 4)
        if rank == 0:
            torch.save(factors, os.path.join(out, "rank0.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svd-llm", "ep-svd-llm"])
def test_smollm2_on_two_gloo_processes(method, tmp_path):
    from conftest import require_bundled_model

    require_bundled_model()
    mp.spawn(_smollm2_worker, args=(2, free_port(), method, str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "rank0.pt")
    expected, reordered = smollm2_factors(method, 4), smollm2_factors(method, 8)
    worst = max(float((got[n] - w).norm() / w.norm()) for n, w in expected.items())
    order = max(float((reordered[n] - w).norm() / w.norm()) for n, w in expected.items())
    assert worst <= 2 * order + 1e-4, (worst, order)


def _streaming_worker(rank, world, port, source, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        svdkern.compress_from_disk(source, out, "ep-svd-llm", 0.3, calib=calibration(), batch_size=2,
                                   save_dtype=torch.float32, progress=False, log=lambda *_: None)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_stream_from_disk(tmp_path):
    """Streaming and data parallelism together (a model larger than memory on several GPUs):
    each rank reads the layers, rank 0 alone writes the output, which holds one process's factors."""
    source, out = str(tmp_path / "src"), str(tmp_path / "out")
    tiny_model("llama", seed=5).save_pretrained(source, max_shard_size="20KB")
    mp.spawn(_streaming_worker, args=(2, free_port(), source, out), nprocs=2)
    got = dense_weights(svdkern.load(out))
    expected, reordered = (one_process("llama", "ep-svd-llm", batch_size) for batch_size in (2, 4))
    assert set(got) == set(expected)
    for name, W in expected.items():
        err = float((got[name] - W).norm() / W.norm())
        assert err <= 2 * float((reordered[name] - W).norm() / W.norm()) + 1e-4, (name, err)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no rank left a temporary directory
