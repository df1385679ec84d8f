"""Every supported family, built tiny from a config: compress, run, save, load."""
import pytest
import torch

import svdkern
from svdkern.models import UnsupportedArchitectureError, architecture_of
from svdkern.nn import LowRankLinear
from svdkern.solvers.rank import rank_for_ratio

from conftest import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma3_text", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_compresses_and_round_trips(family, windows, tmp_path):
    model = tiny_model(family)
    arch = architecture_of(model)
    with torch.no_grad():
        dense_logits = model(windows[:2]).logits
    svdkern.compress(model, "svd-llm", 0.3, calib=windows, progress=False, log=lambda *_: None)
    layers = model.get_submodule(arch.layers_path)
    for layer in layers:
        for name in (n for g in arch.groups for n in g):
            module = layer.get_submodule(name)
            assert isinstance(module, LowRankLinear)
            # ranks from each matrix's own shape (GQA: k/v are narrower than q)
            assert module.rank == rank_for_ratio(module.out_features, module.in_features, 0.3)
    with torch.no_grad():
        logits = model(windows[:2]).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    report = model._svdkern_report
    assert 0.3 <= report.block_ratio < 0.4 and 0 < report.model_ratio < report.block_ratio

    svdkern.save(model, tmp_path / "out")
    loaded = svdkern.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(windows[:2]).logits, logits)


def test_unknown_architecture_names_what_is_missing():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*ARCHITECTURES"):
        svdkern.compress(model, "svd", 0.2)


def test_adapter_mismatch_is_reported():
    model = tiny_model("llama")
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(UnsupportedArchitectureError, match="mlp.gate_proj"):
        architecture_of(model)


def test_gqa_shapes_in_tiny_llama():
    model = tiny_model("llama")
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (24, 48)
