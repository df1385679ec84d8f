"""Streaming from disk (issue 12): a model saved as many small shards is compressed one layer at a
time and gives exactly the in-memory run's factors, output that loads, and resume."""
import os
import random

import pytest
import torch

import svdkern
import svdkern.blocks as blocks
import svdkern.checkpoint as checkpoint
from svdkern.layer_store import DiskLayerStore

from conftest import tiny_model

QUIET = dict(progress=False, log=lambda *_: None)
LAYERS = 3


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def sharded(tmp_path, model_type="llama", seed=4, strip_prefix=False):
    """The tiny model saved as ~20 shards (and, with strip_prefix, its tensors named the way some
    hub checkpoints name them: without the base model's prefix, e.g. OPT's `decoder.…`)."""
    path = tmp_path / f"src-{model_type}"
    model = tiny_model(model_type, seed=seed, layers=LAYERS)
    model.save_pretrained(path, max_shard_size="20KB")
    if strip_prefix:
        import json

        from safetensors.torch import load_file, save_file

        index_file = path / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        for shard in set(index["weight_map"].values()):
            tensors = load_file(path / shard)
            save_file({k.removeprefix("model."): v for k, v in tensors.items()}, path / shard,
                      metadata={"format": "pt"})
        index["weight_map"] = {k.removeprefix("model."): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2 * LAYERS
    return str(path)


def in_memory(method, windows, model_type="llama", seed=4, **knobs):
    model = tiny_model(model_type, seed=seed, layers=LAYERS)
    svdkern.compress(model, method, 0.3, calib=windows, batch_size=4, **knobs, **QUIET)
    return model


def streamed(source, out, windows, method, ckpt=None, **knobs):
    return svdkern.compress_from_disk(source, out, method, 0.3, calib=windows, batch_size=4,
                                      save_dtype=torch.float32, checkpoint_dir=ckpt, **knobs, **QUIET)


def assert_same_output(directory, reference, windows):
    """The saved directory loads (svdkern.load) with the reference's factors and logits, exactly."""
    loaded = svdkern.load(directory)
    want = {n: m for n, m in reference.named_modules() if isinstance(m, svdkern.LowRankLinear)}
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, svdkern.LowRankLinear)}
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.equal(got[name].U, want[name].U) and torch.equal(got[name].V, want[name].V), name
    with torch.no_grad():
        assert torch.equal(loaded(windows[:2]).logits, reference(windows[:2]).logits)


@pytest.mark.parametrize("method,model_type,strip", [
    ("svd", "llama", False), ("svd-llm", "llama", False), ("ep-svd-llm", "llama", False),
    ("sc-svd-llm", "gemma", False), ("saes-svd", "qwen2", False), ("erc-svd", "llama", False),
    ("best", "llama", False), ("ep-svd-llm", "opt", True)])
def test_streamed_run_equals_the_in_memory_run(method, model_type, strip, windows, tmp_path):
    source = sharded(tmp_path, model_type, strip_prefix=strip)
    # best's end-to-end tuning needs the whole model (refused when streaming); its layer-wise
    # levers (sensitivity ranks, output weighting) stream, and block refinement with them
    knobs = dict(tune_epochs=0, refine_epochs=1) if method == "best" else {}
    reference = in_memory(method, windows, model_type, **knobs)
    model = streamed(source, str(tmp_path / "out"), windows, method, **knobs)
    assert all(p.is_meta for p in model.get_submodule(
        svdkern.models.architecture_of(model).layers_path).parameters())  # no layer stayed in memory
    assert_same_output(str(tmp_path / "out"), reference, windows)
    got, want = model._svdkern_report, reference._svdkern_report
    for key in checkpoint.REPORT_FIELDS + ("allocation", "plc"):
        assert getattr(got, key) == getattr(want, key), key
    assert (got.block_params_after, got.model_params_after) == (want.block_params_after, want.model_params_after)


def test_the_default_preset_streams_only_without_its_tuning(windows, tmp_path):
    """`best` tunes end to end, which needs the whole model: streaming it is refused with the fix."""
    source = sharded(tmp_path)
    with pytest.raises(ValueError, match="cannot stream layers from disk.*--tune-epochs 0"):
        streamed(source, str(tmp_path / "out"), windows, svdkern.presets.DEFAULT_METHOD)
    assert not os.path.exists(tmp_path / "out")


def test_streamed_run_resumes_exactly(windows, tmp_path, monkeypatch):
    source = sharded(tmp_path)
    reference = in_memory("ep-svd-llm", windows)
    rng = random.Random(3)
    real_commit, real_run, real_atomic = DiskLayerStore.commit, blocks.run_layer, checkpoint._atomic

    def nth_call(real, when, exc, after=False):
        calls = [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == when and not after:
                raise exc
            out = real(*args, **kwargs)
            if calls[0] == when:
                raise exc  # the layer's shard is written; its progress never lands
            return out
        return wrapper

    cases = [("ctrl-c mid-layer", blocks, "run_layer", real_run, rng.randint(2, 20), KeyboardInterrupt, False),
             ("killed between writes", checkpoint, "_atomic", real_atomic, rng.randint(2, 6), Killed, False),
             ("killed after a shard", DiskLayerStore, "commit", real_commit, 2, Killed, True)]
    for label, owner, name, real, when, exc, after in cases:
        ckpt, out = str(tmp_path / f"ck-{name}"), str(tmp_path / f"out-{name}")
        monkeypatch.setattr(owner, name, nth_call(real, when, exc, after))
        with pytest.raises(exc):
            streamed(source, out, windows, "ep-svd-llm", ckpt)
        monkeypatch.setattr(owner, name, real)
        assert not os.path.exists(out), label  # nothing half-written where the output goes
        model = streamed(source, out, windows, "ep-svd-llm", ckpt)
        assert_same_output(out, reference, windows)
        assert model._svdkern_report.betas == reference._svdkern_report.betas, label
        assert not os.path.exists(ckpt), label


def test_resume_refuses_a_change_of_path(windows, tmp_path, monkeypatch):
    """A checkpoint of an in-memory run is not resumed from disk (their files differ): said by name."""
    source = sharded(tmp_path)
    ckpt = str(tmp_path / "ck")
    real = checkpoint._atomic
    calls = [0]

    def interrupting(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(checkpoint, "_atomic", interrupting)
    with pytest.raises(KeyboardInterrupt):
        svdkern.compress(tiny_model("llama", seed=4, layers=LAYERS), "svd-llm", 0.3, calib=windows,
                         batch_size=4, checkpoint_dir=ckpt, **QUIET)
    monkeypatch.setattr(checkpoint, "_atomic", real)
    with pytest.raises(RuntimeError, match="layers in memory -> streamed from disk"):
        streamed(source, str(tmp_path / "out"), windows, "svd-llm", ckpt)


def test_a_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        svdkern.compress_from_disk(str(tmp_path), str(tmp_path / "out"), "svd-llm")


MEASURE_PEAKS = """
import gc, json, sys, torch, svdkern
from svdkern.host import peak_rss, proc_bytes, reset_peak_rss

windows = torch.randint(0, 1000, (8, 256), generator=torch.Generator().manual_seed(0))
peaks = {}
for source in sys.argv[1:]:  # the first run warms up (imports, allocator): its peak is not used
    gc.collect()
    start = proc_bytes("/proc/self/status", "VmRSS")
    reset_peak_rss()
    svdkern.compress_from_disk(source, source + "-out", "svd-llm", 0.3, calib=windows, batch_size=4,
                               progress=False, log=lambda *_: None)
    peaks[source] = peak_rss() - start
print(json.dumps(peaks))
"""


def test_peak_host_memory_is_one_layer_whatever_the_depth(tmp_path):
    """Measured in a fresh process: compressing 16 layers from disk peaks no higher than 4 layers
    (within a layer's size), and below a bound computed from one layer's working set."""
    import json
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, vocab, tokens = 512, 1376, 1000, 8 * 256
    sources = []
    for layers in (2, 4, 16):
        cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=layers)
        torch.manual_seed(layers)
        path = str(tmp_path / f"layers{layers}")
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="8MB")
        sources.append(path)
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAKS, *sources], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    four, sixteen = peaks[sources[1]], peaks[sources[2]]
    mib = 2 ** 20
    layer = 4 * (4 * hidden * hidden + 3 * hidden * inter)           # one fp32 decoder layer
    grams = 8 * (3 * hidden * hidden + inter * inter)                 # fp64 Grams of its four groups
    bound = (2 * layer                      # the dense layer and its factors
             + 3 * grams                    # Grams, whitening factors and their inverses
             + 2 * 8 * hidden * inter       # the largest whitened target and its SVD, fp64
             + 3 * 4 * tokens * hidden      # activations: the stream, its successor, one group input
             + 2 * 4 * vocab * hidden       # embeddings and head
             + 32 * mib)                    # threads' and libraries' scratch
    numbers = (f"peak above start: 4 layers {four / mib:.0f} MiB, 16 layers {sixteen / mib:.0f} MiB; "
               f"one layer {layer / mib:.1f} MiB, 16 layers {16 * layer / mib:.0f} MiB, bound {bound / mib:.0f} MiB")
    print(numbers)
    assert sixteen < bound, numbers
    assert sixteen - four < layer, numbers
