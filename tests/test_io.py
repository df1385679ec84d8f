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
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
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


def test_mismatched_ranks(saved):
    _, path = saved
    meta = json.loads((path / "svdkern.json").read_text())
    meta["ranks"]["model.layers.0.mlp.up_proj"] += 1
    (path / "svdkern.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        svdkern.load(path)


def test_unknown_module(saved):
    _, path = saved
    meta = json.loads((path / "svdkern.json").read_text())
    meta["ranks"]["model.layers.7.mlp.up_proj"] = 3
    (path / "svdkern.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks"):
        svdkern.load(path)
