"""Output-aware whitening: each output channel weighted by its Fisher sensitivity in the solve.

Oracles: a hand-computed case, invariances, and the optimality the weighting promises (per matrix,
the weighted error is the least any rank-r factors reach; the unweighted solve's is not)."""
import copy

import pytest
import torch

import svdkern
import svdkern.pipeline as pipeline
from svdkern.layer_store import LayerStore
from svdkern.models import architecture_of
from svdkern.policy import measure_fisher
from svdkern.presets import config_for
from svdkern.sensitivity import output_weights
from svdkern.solvers.factorize import factorize
from svdkern.solvers.whiten import whiten

from conftest import tiny_model

QUIET = dict(progress=False, log=lambda *_: None)


def test_a_heavily_weighted_output_takes_the_only_rank():
    """W = diag(3, 2, 1), X = I: plain rank 1 keeps 3; with output 2 weighted 10×, its 1·10 wins."""
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    wh = whiten(torch.eye(3, dtype=torch.float64), damp_rel=0.0)
    U, V = factorize(W, wh, 1)
    assert torch.allclose(U @ V, torch.diag(torch.tensor([3.0, 0, 0], dtype=torch.float64)))
    U, V = factorize(W, wh, 1, out_scale=torch.tensor([1.0, 1.0, 10.0], dtype=torch.float64))
    assert torch.allclose(U @ V, torch.diag(torch.tensor([0, 0, 1.0], dtype=torch.float64)))


def test_uniform_weights_change_nothing_and_the_weighted_error_is_least():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(13, 17, generator=g, dtype=torch.float64)
    X = torch.randn(17, 40, generator=g, dtype=torch.float64)
    wh = whiten(X @ X.T)
    plain = factorize(W, wh, 5)
    same = factorize(W, wh, 5, out_scale=torch.full((13,), 7.0, dtype=torch.float64))
    assert torch.allclose(plain[0] @ plain[1], same[0] @ same[1], atol=1e-10)

    s = torch.rand(13, generator=g, dtype=torch.float64) * 3 + 0.1
    U, V = factorize(W, wh, 5, out_scale=s)

    def weighted(W2):
        return float((s[:, None] * (W - W2) @ X).square().sum())

    least = weighted(U @ V)
    assert least < weighted(plain[0] @ plain[1]) * (1 - 1e-3)
    for _ in range(5):  # no nearby rank-5 product does better
        dU = 1e-3 * torch.randn(U.shape, generator=g, dtype=torch.float64)
        dV = 1e-3 * torch.randn(V.shape, generator=g, dtype=torch.float64)
        assert weighted((U + dU) @ (V + dV)) >= least


def test_output_weights_are_relative_floored_and_softened():
    f = torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # mean 2
    assert torch.allclose(output_weights(f, 1.0) ** 2, torch.tensor([1e-3, 0.5, 1.5, 2.0], dtype=torch.float64))
    assert torch.allclose(output_weights(f, 0.5) ** 4, torch.tensor([1e-3, 0.5, 1.5, 2.0], dtype=torch.float64))
    assert torch.equal(output_weights(f, 0.0), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(output_weights(f * 1e6, 1.0), output_weights(f, 1.0))  # the loss's scale cancels


def _input_grams(model, windows):
    """{"layer.name": X Xᵀ} of every linear in the decoder layers, on the dense model."""
    grams, handles = {}, []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return grams


def test_each_matrix_gets_the_least_fisher_weighted_error(windows):
    """SVD-LLM on the FP stream, uniform ranks: with output_weighting=1 every matrix's
    Σ_i s_i²·‖(W − W′)_i X‖² (s from the measured Fisher) is at most the unweighted solve's, and
    the unweighted ‖(W − W′) X‖² at least: each solve is optimal for its own objective."""
    dense = tiny_model("llama", seed=2, layers=2)
    arch = architecture_of(dense)
    grams = _input_grams(dense, windows)
    cfg = config_for("svd-llm", 0.4, output_weighting=1.0)
    store, cpu = LayerStore(dense.model.layers, "cpu", "cpu"), torch.device("cpu")
    fisher = measure_fisher(dense, store, arch, windows, cfg, 4, cpu, cpu, False)
    plain, weighted = copy.deepcopy(dense), copy.deepcopy(dense)
    svdkern.compress(plain, "svd-llm", 0.4, calib=windows, batch_size=4, **QUIET)
    svdkern.compress(weighted, "svd-llm", 0.4, calib=windows, batch_size=4, output_weighting=1.0, **QUIET)
    checked = 0
    for key, H in grams.items():
        W = dense.model.layers.get_submodule(key).weight.detach().double()
        s2 = output_weights(fisher[key], 1.0) ** 2

        def errors(model):
            m = model.model.layers.get_submodule(key)
            E = W - (m.U @ m.V).detach().double()
            per_output = ((E @ H) * E).sum(1)
            return float((s2 * per_output).sum()), float(per_output.sum())

        (w_plain, u_plain), (w_weighted, u_weighted) = errors(plain), errors(weighted)
        assert w_weighted <= w_plain * (1 + 1e-6), key
        assert u_plain <= u_weighted * (1 + 1e-6), key
        checked += w_weighted < w_plain * (1 - 1e-3)  # and the weighting did something
    assert checked >= len(grams) // 2


def test_an_interrupted_run_keeps_its_fisher_measurement(windows, tmp_path, monkeypatch):
    """Ctrl-C in the allocation after the Fisher pass: the rerun reads it back instead of
    measuring again, and ends with the uninterrupted run's factors."""
    knobs = dict(output_weighting=0.5, sensitivity_samples=8, batch_size=4, **QUIET)
    want = tiny_model("llama", seed=4, layers=2)
    svdkern.compress(want, "best", 0.3, calib=windows, **knobs)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "allocate", interrupted)
    ckpt, said = str(tmp_path / "ckpt"), []
    with pytest.raises(KeyboardInterrupt):
        svdkern.compress(tiny_model("llama", seed=4, layers=2), "best", 0.3, calib=windows, checkpoint_dir=ckpt,
                         **{**knobs, "log": said.append})
    monkeypatch.undo()
    assert "the Fisher measurement is saved" in said[-1] and "resume" in said[-1]  # the user is told
    measured = []
    real = pipeline.measure_fisher
    monkeypatch.setattr(pipeline, "measure_fisher", lambda *a, **k: measured.append(1) or real(*a, **k))
    got = tiny_model("llama", seed=4, layers=2)
    svdkern.compress(got, "best", 0.3, calib=windows, checkpoint_dir=ckpt, **knobs)
    assert not measured
    for name, module in want.named_modules():
        if isinstance(module, svdkern.LowRankLinear):
            other = got.get_submodule(name)
            assert torch.equal(module.U, other.U) and torch.equal(module.V, other.V), name


@pytest.mark.parametrize("knobs, message", [
    (dict(output_weighting=1.5), "must lie in"),
    (dict(output_weighting=0.5, beta_grid=(0.0, 0.5)), "no beta_grid"),
])
def test_bad_output_weighting_is_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        config_for("ep-svd-llm", 0.2, **knobs)
