"""Checkpoints: self-contained, atomic, and loud about corruption or mismatch."""
import json
import os

import pytest
import torch

import svdkern
from svdkern.io import CheckpointError

from conftest import tiny_model


@pytest.fixture
def saved(tmp_path, windows):
    model = tiny_model("llama")
    svdkern.compress(model, "svd-llm", 0.25, calib=windows, progress=False, log=lambda *_: None)
    path = tmp_path / "ckpt"
    svdkern.save(model, path)
    return model, path


def test_directory_is_self_contained(saved):
    _, path = saved
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "svdkern.json"} <= names
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.U" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    meta = json.loads((path / "svdkern.json").read_text())
    assert meta["ranks"]["model.layers.1.mlp.down_proj"] == 24
    assert meta["compression"]["config"]["ratio"] == 0.25


def test_save_refuses_to_clobber_and_overwrites_atomically(saved, windows):
    model, path = saved
    with pytest.raises(FileExistsError, match="overwrite"):
        svdkern.save(model, path)
    svdkern.save(model, path, overwrite=True)
    assert sorted(os.listdir(path.parent)) == ["ckpt"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, windows):
    model = tiny_model("llama")
    svdkern.compress(model, "svd", 0.25, progress=False, log=lambda *_: None)
    import transformers.modeling_utils

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        svdkern.save(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_missing_file(saved):
    _, path = saved
    os.remove(path / "svdkern.json")
    with pytest.raises(CheckpointError, match="svdkern.json is missing"):
        svdkern.load(path)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        svdkern.load(path)


def test_corrupt_metadata(saved):
    _, path = saved
    (path / "svdkern.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        svdkern.load(path)


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def test_mismatched_ranks(saved):
    _, path = saved
    edit_config(path, lambda c: c["quantization_config"]["ranks"].update(
        {"model.layers.0.mlp.up_proj": c["quantization_config"]["ranks"]["model.layers.0.mlp.up_proj"] + 1}))
    with pytest.raises(CheckpointError, match="does not match"):
        svdkern.load(path)


def test_unknown_module(saved):
    _, path = saved
    edit_config(path, lambda c: c["quantization_config"]["ranks"].update({"model.layers.7.mlp.up_proj": 3}))
    with pytest.raises(CheckpointError, match="weights lack model.layers.7.mlp.up_proj.U"):
        svdkern.load(path)


def test_a_newer_format_is_refused_by_both_load_paths(saved):
    from transformers import AutoModelForCausalLM

    _, path = saved
    edit_config(path, lambda c: c["quantization_config"].update({"format_version": 99}))
    with pytest.raises(CheckpointError, match="newer svdkern.*upgrade"):
        AutoModelForCausalLM.from_pretrained(path)
    meta = json.loads((path / "svdkern.json").read_text())
    (path / "svdkern.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="newer svdkern.*upgrade"):
        svdkern.load(path)


def test_saved_directory_is_readable_by_others(saved):
    _, path = saved
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask
    assert all(os.stat(path / name).st_mode & 0o777 == 0o666 & ~mask for name in os.listdir(path))


def test_a_model_from_a_quantized_or_half_source_is_stored_in_bf16(tmp_path, windows):
    model = tiny_model("llama")
    svdkern.compress(model, "svd", 0.25, progress=False, log=lambda *_: None)
    model._svdkern_source = {"model": "x.gguf", "dtype": "quantized"}
    svdkern.save(model, tmp_path / "bf16")
    assert svdkern.load(tmp_path / "bf16").model.layers[0].mlp.up_proj.U.dtype == torch.bfloat16
    svdkern.save(model, tmp_path / "fp32", dtype=torch.float32)
    assert svdkern.load(tmp_path / "fp32").model.layers[0].mlp.up_proj.U.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # saving does not change the model
    from safetensors import safe_open

    for name, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):  # what is on disk, not after loading
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            floating = {key: f.get_tensor(key).dtype for key in f.keys()}
        floating = {k: d for k, d in floating.items() if d.is_floating_point}
        assert len(floating) > 20 and set(floating.values()) == {want}, name
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")


def test_saving_an_uncompressed_model_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no LowRankLinear layers: compress it first"):
        svdkern.save(tiny_model("llama"), tmp_path / "dense")
    assert os.listdir(tmp_path) == []
