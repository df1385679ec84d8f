"""Resume: an interrupted run (Ctrl-C, or a process killed at any instant) resumes to the
uninterrupted run's factors and report, and refuses, naming what changed, when it cannot."""
import copy
import dataclasses
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import svdkern
import svdkern.blocks as blocks
import svdkern.checkpoint as checkpoint

from conftest import REPO, tiny_model

QUIET = dict(progress=False, log=lambda *_: None)
METHODS = ["svd-llm", "sc-svd-llm", "ep-svd-llm", "saes-svd", "erc-svd", "best", "aa-svd"]
LAYERS = 3


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except KeyboardInterrupt`."""


def factors(model):
    return {n: (m.U.detach().clone(), m.V.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, svdkern.LowRankLinear)}


def run(method, windows, ckpt=None, seed=5, batch_size=4, **knobs):
    model = tiny_model("llama", seed=seed, layers=LAYERS)
    svdkern.compress(model, method, 0.3, calib=windows, checkpoint_dir=ckpt, batch_size=batch_size,
                     **knobs, **QUIET)
    return model


def assert_same_run(got, want):
    fg, fw = factors(got), factors(want)
    assert fg.keys() == fw.keys()
    for name in fw:
        assert torch.equal(fg[name][0], fw[name][0]) and torch.equal(fg[name][1], fw[name][1]), name
    pg, pw = dict(got.named_parameters()), dict(want.named_parameters())  # norms too (aa-svd trains them)
    assert pg.keys() == pw.keys() and all(torch.equal(pg[n], pw[n]) for n in pw)
    rg, rw = got._svdkern_report, want._svdkern_report
    for key in checkpoint.REPORT_FIELDS + ("allocation", "plc"):
        assert getattr(rg, key) == getattr(rw, key), key


def count_calls(monkeypatch, module, name, method, windows, ckpt):
    """How many times an uninterrupted, checkpointed run calls module.name."""
    real, calls = getattr(module, name), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    run(method, windows, ckpt)
    monkeypatch.setattr(module, name, real)
    return calls[0]


def interrupt_at(monkeypatch, module, name, when, exc, half_write=False):
    real, calls = getattr(module, name), [0]

    def interrupting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == when:
            if half_write:  # died after writing the temporary file, before the rename
                args[0](args[1] + ".tmp")
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    return real


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_and_kill_at_random_points_resume_exactly(method, windows, tmp_path, monkeypatch):
    rng = random.Random(method)
    reference = run(method, windows)
    layer_forwards = count_calls(monkeypatch, blocks, "run_layer", method, windows, str(tmp_path / "count"))
    writes = count_calls(monkeypatch, checkpoint, "_atomic", method, windows, str(tmp_path / "count"))
    assert writes >= LAYERS  # every layer checkpoints (ERC's dense layers too)
    cases = [("ctrl-c mid-layer", blocks, "run_layer", rng.randint(1, layer_forwards), KeyboardInterrupt, False),
             ("killed mid-write", checkpoint, "_atomic", rng.randint(1, writes), Killed, True),
             ("killed between writes", checkpoint, "_atomic", rng.randint(1, writes), Killed, False)]
    for label, module, name, when, exc, half in cases:
        ckpt = str(tmp_path / label.replace(" ", "-"))
        real = interrupt_at(monkeypatch, module, name, when, exc, half)
        with pytest.raises(exc):
            run(method, windows, ckpt)
        monkeypatch.setattr(module, name, real)
        resumed = run(method, windows, ckpt)
        assert_same_run(resumed, reference)
        assert not os.path.exists(ckpt), label


def test_resumed_run_reports_its_whole_time(windows, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ck")
    real = interrupt_at(monkeypatch, checkpoint, "_atomic", 5, KeyboardInterrupt)  # in layer 1's save
    with pytest.raises(KeyboardInterrupt):
        run("ep-svd-llm", windows, ckpt)
    monkeypatch.setattr(checkpoint, "_atomic", real)
    import json

    with open(os.path.join(ckpt, "progress.json")) as f:
        first_part = json.load(f)["seconds"]
    resumed = run("ep-svd-llm", windows, ckpt)
    assert first_part > 0 and resumed._svdkern_report.seconds > first_part


@pytest.mark.parametrize("change,expected", [
    (dict(batch_size=2), "batch size 4 -> 2"),
    (dict(seed=6), "the model's weights"),
    (dict(knobs=dict(beta=0.25)), "beta 0.5 -> 0.25"),
    (dict(windows=True), "calibration windows"),
])
def test_resume_with_other_inputs_is_refused_by_name(change, expected, windows, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ck")
    real = interrupt_at(monkeypatch, checkpoint, "_atomic", 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run("ep-svd-llm", windows, ckpt)
    monkeypatch.setattr(checkpoint, "_atomic", real)
    before = sorted(os.listdir(ckpt))
    other = windows.flip(0) if change.get("windows") else windows
    with pytest.raises(RuntimeError, match="other settings") as err:
        run("ep-svd-llm", other, ckpt, seed=change.get("seed", 5), batch_size=change.get("batch_size", 4),
            **change.get("knobs", {}))
    assert expected in str(err.value)
    assert sorted(os.listdir(ckpt)) == before  # a refused run touches nothing


def test_a_killed_process_resumes_exactly(windows, tmp_path):
    """A real SIGKILL in a child process, then resume here.

    Writes: allocation, then per layer its factors, its stream file and progress.json. Dying at
    write 7 leaves layer 1's stream file on disk with progress.json still at layer 0.
    """
    ckpt = str(tmp_path / "ck")
    torch.save(windows, tmp_path / "windows.pt")
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import svdkern, svdkern.checkpoint as checkpoint
        from conftest import tiny_model
        real, calls = checkpoint._atomic, [0]
        def dying(write, path):
            calls[0] += 1
            if calls[0] == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            real(write, path)
        checkpoint._atomic = dying
        model = tiny_model("llama", seed=5, layers={LAYERS})
        svdkern.compress(model, "ep-svd-llm", 0.3, calib=torch.load({str(tmp_path / 'windows.pt')!r}),
                         checkpoint_dir={ckpt!r}, batch_size=4, progress=False, log=lambda *_: None)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(os.listdir(ckpt)) == ["allocation.json", "layer_0000.safetensors", "layer_0001.safetensors",
                                        "progress.json", "streams_0000.pt", "streams_0001.pt"]
    assert_same_run(run("ep-svd-llm", windows, ckpt), run("ep-svd-llm", windows))


def _another_value(value):
    """A different value of the same kind (the config is not re-validated: only its record matters)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.125
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, tuple):
        return value + (0.5,)
    if value is None:
        return 3
    if isinstance(value, torch.dtype):
        return torch.float32 if value != torch.float32 else torch.float64
    raise AssertionError(f"no other value for {value!r}: extend _another_value")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(svdkern.CompressionConfig)])
def test_every_setting_that_shapes_the_factors_is_refused_on_resume(field, windows, tmp_path):
    """Generated from CompressionConfig's fields, so a new knob is covered without editing this test."""
    from svdkern.layer_store import LayerStore
    from svdkern.presets import config_for

    model = tiny_model("llama", seed=5, layers=1)
    store = LayerStore(model.get_submodule("model.layers"), "cpu", "cpu")
    cfg = config_for("best", 0.3)
    other = copy.copy(cfg)
    object.__setattr__(other, field, _another_value(getattr(cfg, field)))
    saved = checkpoint.Checkpoint(str(tmp_path / "ck"), checkpoint.fingerprint(model, store, windows, cfg, 4), 0.0)
    saved.save_allocation({}, {})
    resumed = checkpoint.Checkpoint(str(tmp_path / "ck"), checkpoint.fingerprint(model, store, windows, other, 4), 0.0)
    with pytest.raises(RuntimeError, match=f"method settings {field} "):
        resumed.load_allocation()


def test_ctrl_c_in_the_spectra_pass_resumes_from_its_last_layer(windows, tmp_path, monkeypatch):
    """`best`'s allocation measures every layer's whitened spectra before any layer is compressed:
    an interrupted pass keeps the layers it finished, says so, and the rerun measures only the rest."""
    import svdkern.sensitivity as sensitivity

    knobs = dict(sensitivity_samples=8)
    want = factors(run("best", windows, **knobs))
    per_layer = sum(len(g) for g in svdkern.models.architecture_of(tiny_model("llama")).groups)
    real, solves = sensitivity.svd_of, []

    def counted(*args, **kwargs):
        solves.append(1)
        if len(solves) == per_layer + 1:  # the first matrix of the second layer
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "svd_of", counted)
    ckpt, said = str(tmp_path / "ckpt"), []
    with pytest.raises(KeyboardInterrupt):
        svdkern.compress(tiny_model("llama", seed=5, layers=LAYERS), "best", 0.3, calib=windows, checkpoint_dir=ckpt,
                         batch_size=4, progress=False, log=said.append, **knobs)
    assert "the spectra of the layers measured" in said[-1] and "Fisher" in said[-1], said[-1]
    solves.clear()
    monkeypatch.setattr(sensitivity, "svd_of", lambda *a, **k: solves.append(1) or real(*a, **k))
    got = factors(run("best", windows, ckpt=ckpt, **knobs))
    assert len(solves) == (LAYERS - 1) * per_layer  # layer 0's spectra were read back
    assert got.keys() == want.keys()
    for name, (U, V) in want.items():
        assert torch.equal(got[name][0], U) and torch.equal(got[name][1], V), name
    assert not os.path.exists(ckpt)  # a finished run leaves nothing behind


@pytest.mark.parametrize("method,refused", [("aa-svd", True), ("ep-svd-llm", False)])
def test_an_older_aa_svd_refinement_checkpoint_is_refused(method, refused, windows, tmp_path):
    """Before 2026-12-08 every refinement stepped once per micro-batch; aa-svd now steps once per 32
    windows, so its older checkpoints (fingerprints without the key) would mix the two."""
    from svdkern.layer_store import LayerStore
    from svdkern.presets import config_for

    model = tiny_model("llama", seed=5, layers=1)
    store = LayerStore(model.get_submodule("model.layers"), "cpu", "cpu")
    cfg = config_for(method, 0.3, refine_epochs=2)
    older = checkpoint.fingerprint(model, store, windows, cfg, 4)
    del older["refine_step_windows"]
    saved = checkpoint.Checkpoint(str(tmp_path / "ck"), older, 0.0)
    saved.save_allocation({}, {})
    resumed = checkpoint.Checkpoint(str(tmp_path / "ck"), checkpoint.fingerprint(model, store, windows, cfg, 4), 0.0)
    if refused:
        with pytest.raises(RuntimeError, match="refinement windows per step one micro-batch -> 32"):
            resumed.load_allocation()
    else:
        assert resumed.load_allocation() is not None
