"""The layer-by-layer driver: every method runs, streams behave, budgets hold, runs resume."""
import pytest
import torch

import svdkern
from svdkern.models import architecture_of
from svdkern.pipeline import compress_model
from svdkern.presets import PRESETS, config_for
from svdkern.stats import ActivationNotFiniteError

from conftest import tiny_model

QUIET = dict(progress=False, log=lambda *_: None)


def factors(model):
    return {n: (m.U.detach().clone(), m.V.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, svdkern.LowRankLinear)}


def output_error(model, dense, windows):
    with torch.no_grad():
        a, b = model(windows).logits, dense(windows).logits
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_method_runs_and_removes_the_budget(method, windows):
    model = tiny_model("llama", seed=1)
    svdkern.compress(model, method, 0.4, calib=windows, **QUIET)
    report = model._svdkern_report
    assert report.block_ratio >= 0.4 - 1e-9
    # floor() of ranks removes at most one rank's worth per matrix beyond the budget
    slack = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, svdkern.LowRankLinear))
    assert report.block_params_after >= (1 - 0.4) * report.block_params_before - slack


def test_whitening_beats_plain_svd_and_error_compensation_beats_both(windows):
    """End-to-end output error on the calibration windows (seed 2: 1.30 / 1.11 / 1.12 / 0.88 / 0.97)."""
    dense = tiny_model("llama", seed=2)
    errors, got = {}, {}
    for method in ("svd", "svd-llm", "sc-svd-llm", "ep-svd-llm", "saes-svd"):
        model = tiny_model("llama", seed=2)
        svdkern.compress(model, method, 0.5, calib=windows, **QUIET)
        errors[method] = output_error(model, dense, windows)
        got[method] = factors(model)
    assert errors["svd-llm"] < 0.9 * errors["svd"]
    # compensating the propagated error is the point of the two-stream methods
    assert errors["ep-svd-llm"] < 0.9 * min(errors["svd-llm"], errors["sc-svd-llm"])
    assert errors["saes-svd"] < 0.95 * min(errors["svd-llm"], errors["sc-svd-llm"])
    key = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(got["sc-svd-llm"][key][0], got["svd-llm"][key][0])
    # the first group of layer 0 sees identical inputs in every stream
    k0 = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(got["sc-svd-llm"][k0][1], got["svd-llm"][k0][1], rtol=1e-4, atol=1e-5)


def test_two_streams_with_beta_zero_equal_sc(windows):
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    compress_model(a, windows, config_for("sc-svd-llm", 0.3), **QUIET)
    compress_model(b, windows, config_for("ep-svd-llm", 0.3, beta=0.0), **QUIET)
    fa, fb = factors(a), factors(b)
    for name in fa:
        torch.testing.assert_close(fa[name][0] @ fa[name][1], fb[name][0] @ fb[name][1], rtol=1e-5, atol=1e-6)


def test_plc_compresses_only_the_last_layers_exactly(windows):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=48, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    logs = []
    svdkern.compress(model, "erc-svd", 0.2, calib=windows % 64, plc_step=1, progress=False, log=logs.append)
    plc = model._svdkern_report.plc
    assert set(plc["errors"]) == {1, 2, 3, 4}  # layer ratio 0.8/k stays <= 0.94 for every k
    assert sum("final-layer relative error" in line for line in logs) == len(plc["errors"])
    k = plc["layers"]
    assert plc["errors"][k] == min(plc["errors"].values())
    layers = model.model.layers
    for i, layer in enumerate(layers):
        compressed = isinstance(layer.self_attn.q_proj, svdkern.LowRankLinear)
        assert compressed == (i >= len(layers) - k)
    report = model._svdkern_report
    assert report.block_ratio >= 0.2
    # within the uniform rule's budget, and short of it by less than one rank of one matrix
    from svdkern.allocation import budget_of
    from svdkern.policy import matrix_shapes

    budget = budget_of(matrix_shapes(layers, architecture_of(model)), 0.2)
    assert budget - max(48 + 96, 2 * 48) < report.block_params_after <= budget
    from svdkern.solvers.rank import residual_rank

    for name, rr in report.residual_ranks.items():
        m = model.get_submodule("model.layers." + name)
        assert rr == residual_rank(m.out_features, m.in_features, m.rank, 0.05)
    assert max(report.residual_ranks.values()) >= 1


def test_nan_activations_are_reported(windows):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ActivationNotFiniteError, match="NaN or Inf"):
        svdkern.compress(model, "svd-llm", 0.3, calib=windows, **QUIET)


def test_too_few_calibration_tokens(windows):
    with pytest.raises(ValueError, match="fewer than the widest layer input"):
        svdkern.compress(tiny_model("llama"), "svd-llm", 0.3, calib=windows[:2, :10], **QUIET)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown method"):
        config_for("nope", 0.2)
    with pytest.raises(ValueError, match="stream='both'"):
        config_for("svd-llm", 0.2, beta=0.5)
    with pytest.raises(ValueError, match="aces chooses beta"):
        config_for("saes-svd", 0.2, beta=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        config_for("ep-svd-llm", 0.2, beta=1.5)


def test_checkpoint_cleanup_leaves_other_files(windows, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    svdkern.compress(tiny_model("llama"), "svd-llm", 0.3, calib=windows, checkpoint_dir=str(tmp_path), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_fp_group_input_cache_changes_nothing(windows):
    cached, recomputed = tiny_model("llama", seed=6), tiny_model("llama", seed=6)
    compress_model(cached, windows, config_for("ep-svd-llm", 0.3), **QUIET)
    compress_model(recomputed, windows, config_for("ep-svd-llm", 0.3, fp_cache_bytes=0), **QUIET)
    fa, fb = factors(cached), factors(recomputed)
    for name in fa:
        assert torch.equal(fa[name][0], fb[name][0]) and torch.equal(fa[name][1], fb[name][1])


@pytest.mark.parametrize("model_type,knobs", [("llama", {}), ("mistral", {}), ("qwen2", {}), ("gemma", {}),
                                              ("llama", dict(refine_epochs=3, refine_lr=3e-3, holdout_batches=0))])
def test_staged_executor_reproduces_the_layer_and_the_generic_driver(model_type, knobs, windows, monkeypatch):
    """Also with refinement, which changes the factors after the staged results were computed."""
    import svdkern.pipeline as pipeline
    from svdkern.blocks import capture_layer_inputs, run_layer
    from svdkern.staged import LlamaStages, stageable

    model = tiny_model(model_type, seed=9)
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    assert stageable(layers[0], arch.groups)
    inputs = capture_layer_inputs(model, layers, windows, 4, "cpu", "cpu")
    with torch.no_grad():
        staged = LlamaStages(layers[0], inputs.hidden, inputs.kwargs[0], "cpu", "cpu").outputs()
        for got, h, kw in zip(staged, inputs.hidden, inputs.kwargs[0]):
            torch.testing.assert_close(got, run_layer(layers[0], h, kw), rtol=1e-5, atol=1e-6)
    runs = {}
    for label, allowed in (("staged", True), ("generic", False)):
        if not allowed:
            monkeypatch.setattr(pipeline, "_can_stage", lambda *a: False)
        work = tiny_model(model_type, seed=9)
        report = compress_model(work, windows, config_for("ep-svd-llm", 0.4, **knobs), **QUIET)
        assert not knobs or all(r["steps"] > 0 for r in report.refine.values())
        runs[label] = factors(work)
    for name, (U, V) in runs["generic"].items():
        Us, Vs = runs["staged"][name]
        torch.testing.assert_close(Us @ Vs, U @ V, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "opt"])
def test_layers_with_other_shapes_are_not_staged(model_type):
    from svdkern.staged import stageable

    model = tiny_model(model_type)
    arch = architecture_of(model)
    assert not stageable(model.get_submodule(arch.layers_path)[0], arch.groups)


def test_aligned_ranks_stay_within_the_budget():
    from svdkern.solvers.rank import aligned_rank

    assert aligned_rank(1638, "auto") == 1632        # 64 would drop 38 > 2%: 32 drops 6
    assert aligned_rank(1750, "auto") == 1728        # 64 drops 22 ≤ 35
    assert aligned_rank(230, "auto") == 230          # 8 would drop 6 > 4.6: kept
    assert aligned_rank(45, 8) == 40 and aligned_rank(5, 8) == 5 and aligned_rank(45, 1) == 45
    with pytest.raises(ValueError, match="alignment"):
        aligned_rank(45, 12)


@pytest.mark.parametrize("method", ["svd", "svd-llm", "erc-svd"])
def test_rank_align_gives_multiples_within_the_budget(method, windows):
    model = tiny_model("llama", seed=1)
    svdkern.compress(model, method, 0.3, calib=windows, rank_align=8, **QUIET)
    report = model._svdkern_report
    low = {n: m for n, m in model.named_modules() if isinstance(m, svdkern.LowRankLinear)}
    assert low and all(m.rank % 8 == 0 for m in low.values())
    assert report.aligned_ranks and all(report.ranks[n] != r for n, r in report.aligned_ranks.items())
    # what rounding down freed is given back: the uniform budget, to within one step of 8 ranks of
    # a matrix that could still take one (below its break-even rank)
    from svdkern.allocation import break_even_rank, budget_of
    from svdkern.policy import matrix_shapes

    budget = budget_of(matrix_shapes(model.get_submodule("model.layers"), architecture_of(model)), 0.3)
    kept = report.block_params_after
    raisable = [8 * (m.in_features + m.out_features) for m in low.values()
                if m.rank + 8 <= break_even_rank(m.out_features, m.in_features)]
    assert kept <= budget and raisable and budget - kept < min(raisable)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v carry biases
def test_padded_ranks_are_exact(model_type, tmp_path, windows):
    from svdkern.blocks import pad_ranks

    model = tiny_model(model_type, seed=1)
    svdkern.compress(model, "svd-llm", 0.3, calib=windows, rank_align=1, **QUIET)
    with torch.no_grad():
        before = model(windows[:2]).logits
    svdkern.save(model, str(tmp_path / "m"))
    loaded = svdkern.load(str(tmp_path / "m"), pad_ranks_to=16)
    low = [m for m in loaded.modules() if isinstance(m, svdkern.LowRankLinear)]
    assert all(m.rank % 16 == 0 or m.rank + 16 > min(m.in_features, m.out_features) for m in low)
    assert any(m.rank % 16 == 0 for m in low)
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows[:2]).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        pad_ranks(loaded, 0)


@pytest.mark.parametrize("method,knobs,stages", [
    ("svd", {}, {"solves"}),
    ("svd-llm", {}, {"capture", "statistics", "solves"}),
    ("ep-svd-llm", {"refine_epochs": 1}, {"capture", "statistics", "solves", "refinement"}),
    ("best", {}, {"capture", "allocation", "statistics", "solves", "tuning"}),
])
def test_report_says_where_the_time_went(method, knobs, stages, windows, tmp_path):
    model = tiny_model("llama", seed=1)
    svdkern.compress(model, method, 0.3, calib=windows, checkpoint_dir=str(tmp_path / "ckpt"), **knobs, **QUIET)
    report = model._svdkern_report
    spent = report.stage_seconds
    expected = stages | {"forward and the rest"} | ({"checkpoint I/O", "allocation"} if method != "svd" else set())
    assert set(spent) == expected and all(v >= 0 for v in spent.values())
    assert all(spent[s] > 0 for s in stages)
    assert sum(spent.values()) == pytest.approx(report.seconds, rel=0.05, abs=0.05)
    assert report.peak_host_bytes > 0 and "time by stage (this process" in report.summary()


def test_stage_clock_counts_nested_stages_once_and_survives_errors():
    from svdkern.clock import StageClock, timed

    clock = StageClock(torch.device("cpu"))
    with clock.activate():
        with timed("solves"):
            with timed("statistics"):  # inside another stage: counted by the outer one only
                pass
        with pytest.raises(KeyError):
            with timed("capture"):
                raise KeyError("boom")
        with timed("statistics"):  # the failed stage left the clock usable
            pass
    assert set(clock.seconds) == {"solves", "capture", "statistics"}
    with timed("never"):  # no clock active: a no-op
        pass
    assert "never" not in clock.seconds
