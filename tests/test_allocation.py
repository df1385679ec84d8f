"""Rank policies: budget-exact on every architecture, dense at zero compression, sensitivity that
follows the loss, and refinement that never ends worse than it started."""
import copy
import math

import pytest
import torch

import svdkern
from svdkern.allocation import (MatrixShape, break_even_rank, budget_of, total_kept, uniform_ranks, v2_ranks,
                                water_fill)
from svdkern.blocks import capture_layer_inputs, run_layer
from svdkern.layer_store import LayerStore
from svdkern.models import architecture_of
from svdkern.policy import allocate, matrix_shapes, measure_fisher
from svdkern.presets import config_for
from svdkern.refine import refine_block, relative_block_error

from conftest import tiny_model

QUIET = dict(progress=False, log=lambda *_: None)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt"]
SHAPES = [MatrixShape(f"{i}.{t}", m, n) for i in range(3)
          for t, m, n in (("q", 48, 48), ("k", 24, 48), ("up", 96, 48), ("down", 48, 96), ("odd", 40, 48))]


def random_importance(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {s.name: torch.rand(min(s.m, s.n), generator=gen).sort(descending=True).values
            * torch.rand(1, generator=gen) for s in shapes}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["plc", "v2", "sensitivity"])
def test_every_policy_keeps_at_most_the_uniform_parameters(arch, policy):
    windows = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(1))  # qwen3: 512-wide o_proj
    uniform = tiny_model(arch, seed=4)
    svdkern.compress(uniform, "svd-llm", 0.4, calib=windows, **QUIET)
    model = tiny_model(arch, seed=4)
    svdkern.compress(model, "svd-llm", 0.4, calib=windows, layer_policy=policy, **QUIET)
    report = model._svdkern_report
    assert report.block_params_after <= uniform._svdkern_report.block_params_after
    # and not far under it: the policy spends the budget (one matrix's step of slack)
    slack = max(s.m * s.n for s in matrix_shapes(model.get_submodule(architecture_of(model).layers_path),
                                                  architecture_of(model)))
    assert report.block_params_after >= uniform._svdkern_report.block_params_after - slack


@pytest.mark.parametrize("seed", range(5))
def test_water_fill_is_budget_exact_and_greedy(seed):
    importance = random_importance(SHAPES, seed)
    for ratio in (0.2, 0.4, 0.6):
        budget = budget_of(SHAPES, ratio)
        ranks = water_fill(SHAPES, budget, importance)
        spent = total_kept(SHAPES, ranks)
        assert spent <= budget
        # nothing that fits is left out: every low-rank matrix's next component costs m+n
        leftover = budget - spent
        assert all(leftover < s.m + s.n for s in SHAPES if ranks[s.name] is not None)


def test_water_fill_prefers_the_important_matrix():
    shapes = [MatrixShape("a", 48, 48), MatrixShape("b", 48, 48)]
    flat = torch.linspace(1.0, 0.5, 48)
    ranks = water_fill(shapes, budget_of(shapes, 0.5), {"a": 10 * flat, "b": flat})
    assert ranks["a"] is None or ranks["a"] > ranks["b"]


def test_zero_compression_returns_the_dense_model():
    dense_total = sum(s.m * s.n for s in SHAPES)
    assert set(water_fill(SHAPES, dense_total, random_importance(SHAPES)).values()) == {None}
    assert set(uniform_ranks(SHAPES, 0.0).values()) == {None}
    losses = {s.name: 10.0 + i for i, s in enumerate(SHAPES)}
    assert set(v2_ranks(SHAPES, 0.0, losses).values()) == {None}


def test_v2_rule_gives_lossier_matrices_more_rank_within_budget():
    shapes = [MatrixShape(f"{i}.q", 48, 48) for i in range(4)]
    losses = {"0.q": 10.0, "1.q": 100.0, "2.q": 1000.0, "3.q": 10000.0}
    ranks = v2_ranks(shapes, 0.4, losses)
    assert ranks["0.q"] < ranks["1.q"] < ranks["2.q"] < ranks["3.q"]
    assert total_kept(shapes, ranks) <= budget_of(shapes, 0.4)


@pytest.mark.parametrize("ratio,log_losses,expected", [
    (0.4, (1.0, 3.0), (9, 19)),   # ρ ∝ 1/log L, mean 0.4: ρ = 0.6, 0.2 → ⌊0.4·24⌋, ⌊0.8·24⌋
    (0.4, (1.0, 9.0), (6, 22)),   # ρ = 0.72, 0.08
    (0.7, (1.0, 3.0), (1, 13)),   # ρ = 1.05 clamps to 0.95, the other takes 1.4 − 0.95 = 0.45
])
def test_v2_rule_against_hand_computed_ranks(ratio, log_losses, expected):
    shapes = [MatrixShape("0.q", 48, 48), MatrixShape("1.q", 48, 48)]  # mn/(m+n) = 24
    ranks = v2_ranks(shapes, ratio, {s.name: math.exp(x) for s, x in zip(shapes, log_losses)})
    assert (ranks["0.q"], ranks["1.q"]) == expected


def test_v2_losses_are_the_output_error_of_the_truncated_matrix(windows):
    """‖(W − W_r)X‖_F over every calibration token, W_r the whitened rank-r truncation, in float64."""
    import svdkern.policy as policy
    from svdkern.blocks import input_of

    model = tiny_model("llama", seed=3)
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    seen = {}
    real = policy.v2_losses
    policy.v2_losses = lambda *a: seen.setdefault("losses", real(*a))
    try:
        _allocation(model, windows, layer_policy="v2", rank_align=1)
    finally:
        policy.v2_losses = real
    inputs = capture_layer_inputs(model, layers, windows, 8, "cpu", "cpu")
    hidden = inputs.hidden
    uniform = uniform_ranks(matrix_shapes(layers, arch), 0.5)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for name in (n for g in arch.groups for n in g):
                X = torch.cat([input_of(layer, name, h, kw).flatten(0, -2)
                               for h, kw in zip(hidden, inputs.kwargs[i])]).double().T
                W = layer.get_submodule(name).weight.double()
                L = torch.linalg.cholesky(X @ X.T)
                U, S, Vh = torch.linalg.svd(W @ L)
                r = uniform[f"{i}.{name}"]
                W_r = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(L)
                want = float(torch.linalg.norm((W - W_r) @ X))
                assert seen["losses"][f"{i}.{name}"] == pytest.approx(want, rel=1e-4), (i, name)
            hidden = [run_layer(layer, h, kw) for h, kw in zip(hidden, inputs.kwargs[i])]


def _allocation(model, windows, **knobs):
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    cfg = config_for("svd-llm", 0.5, **knobs)
    inputs = capture_layer_inputs(model, layers, windows, 8, torch.device("cpu"), torch.device("cpu"))
    store, cpu = LayerStore(layers, "cpu", "cpu"), torch.device("cpu")
    with torch.no_grad():
        fisher = measure_fisher(model, store, arch, windows, cfg, 8, cpu, cpu, False) if cfg.needs_fisher else None
        ranks, _ = allocate(store, arch, inputs, cfg, cpu, cpu, False, lambda *_: None, fisher)
    return ranks


def test_sensitivity_gives_rank_where_the_loss_needs_it(windows):
    """Layer 1's attention output is scaled to almost nothing: its q/k/v hardly move the loss.

    Their whitened spectra are untouched (the change is downstream of them), so an allocation
    by spectra alone keeps giving them rank; the measured sensitivity moves it elsewhere.
    """
    model = tiny_model("llama", seed=5)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    by_loss = _allocation(model, windows, layer_policy="sensitivity")
    floor = 1
    for name in ("q_proj", "k_proj", "v_proj"):
        assert by_loss[f"1.self_attn.{name}"] == floor
        assert by_loss[f"0.self_attn.{name}"] is None or by_loss[f"0.self_attn.{name}"] > floor
    by_spectra = _allocation(model, windows, layer_policy="v2")
    assert by_spectra["1.self_attn.v_proj"] > floor


def test_refinement_never_increases_the_block_error_it_minimizes(windows):
    model = tiny_model("llama", seed=6)
    dense = copy.deepcopy(model)
    svdkern.compress(model, "svd-llm", 0.6, calib=windows, **QUIET)
    layer, original = model.model.layers[0], dense.model.layers[0]
    inputs = capture_layer_inputs(dense, dense.model.layers, windows, 4, "cpu", "cpu")
    x, kw = inputs.hidden, inputs.kwargs[0]
    with torch.no_grad():
        y = [run_layer(original, h, k) for h, k in zip(x, kw)]
    before = relative_block_error(layer, run_layer, x, y, kw, "cpu")
    # a sane step size lowers the error on the windows that choose the kept state ...
    tuned = copy.deepcopy(layer)
    result = refine_block(tuned, run_layer, x, y, kw, epochs=5, lr=3e-3, holdout=1, device="cpu")
    assert result.before == pytest.approx(relative_block_error(layer, run_layer, x[-1:], y[-1:], kw[-1:], "cpu"))
    assert result.after < result.before and result.steps > 0
    # ... and a diverging one is rejected: the factors come back unchanged
    wild = copy.deepcopy(layer)
    result = refine_block(wild, run_layer, x, y, kw, epochs=2, lr=10.0, holdout=0, device="cpu")
    assert result.after == result.before and result.steps == 0
    assert relative_block_error(wild, run_layer, x, y, kw, "cpu") == pytest.approx(before)


def test_refinement_steps_each_layers_factors_from_the_compressed_stream_to_the_dense_output(windows,
                                                                                             monkeypatch):
    """What refinement trains on (the compressed model's inputs of the layer, the dense model's
    outputs of it) and what it changes (that layer's U and V, nothing else), recorded at each call."""
    import svdkern.pipeline as pipeline

    model = tiny_model("llama", seed=7, layers=3)
    dense = copy.deepcopy(model)
    calls, real = [], pipeline.refine_block

    def recorded(layer, run, inputs, targets, kwargs, **kw):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = real(layer, run, inputs, targets, kwargs, **kw)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        calls.append(([x.clone() for x in inputs], [y.clone() for y in targets], changed, result.steps))
        return result

    monkeypatch.setattr(pipeline, "refine_block", recorded)
    svdkern.compress(model, "ep-svd-llm", 0.4, calib=windows, batch_size=4, refine_epochs=3, refine_lr=3e-3,
                     holdout_batches=0, rank_align=1, **QUIET)
    assert len(calls) == 3
    got_in, want_out = (capture_layer_inputs(m, m.model.layers, windows, 4, "cpu", "cpu") for m in (model, dense))
    x, y, kw = got_in.hidden, want_out.hidden, got_in.kwargs
    with torch.no_grad():
        for i, (inputs, targets, changed, steps) in enumerate(calls):
            y = [run_layer(dense.model.layers[i], h, k) for h, k in zip(y, kw[i])]
            for got, want in zip(inputs, x):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for got, want in zip(targets, y):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            factors = {f"model.layers.{i}.{n}" for n, m in model.model.layers[i].named_modules()
                       if isinstance(m, svdkern.LowRankLinear) for n in (f"{n}.U", f"{n}.V")}
            assert steps > 0 and changed == factors, i
            x = [run_layer(model.model.layers[i], h, k) for h, k in zip(x, kw[i])]


@pytest.mark.parametrize("method,knobs", [
    ("ep-svd-llm", dict(layer_policy="plc", residual_beta=0.05)),
    ("sc-svd-llm", dict(layer_policy="v2")),
    ("saes-svd", dict(layer_policy="sensitivity", residual_beta=0.05)),
    ("erc-svd", dict(layer_policy="sensitivity")),
    ("best", dict(refine_epochs=2, refine_lr=1e-3)),
    ("svd-llm", dict(layer_policy="v2", refine_epochs=1, refine_lr=1e-3)),
])
def test_policies_compose_with_every_stream_and_rec(method, knobs, windows):
    uniform = tiny_model("llama", seed=7)
    svdkern.compress(uniform, "svd-llm", 0.4, calib=windows, **QUIET)
    model = tiny_model("llama", seed=7)
    svdkern.compress(model, method, 0.4, calib=windows, batch_size=4, **knobs, **QUIET)
    report = model._svdkern_report
    assert report.block_params_after <= uniform._svdkern_report.block_params_after
    assert set(report.ranks) == {k for k, r in report.allocation.items() if r is not None}
    assert all(report.ranks[k] == r for k, r in report.allocation.items() if r is not None)
    if knobs.get("residual_beta"):
        assert any(rr > 0 for rr in report.residual_ranks.values())
    if knobs.get("refine_epochs"):
        assert len(report.refine) == 2
        assert all(r["after"] <= r["before"] for r in report.refine.values())
    with torch.no_grad():
        assert torch.isfinite(model(windows[:2]).logits).all()


@pytest.mark.parametrize("knobs", [{}, dict(refine_epochs=2, tune_epochs=0)])
def test_best_preset_runs_on_a_bfloat16_model(windows, knobs):
    """Tuning and block refinement step in fp32 and hand the factors back in the model's dtype."""
    model = tiny_model("llama", seed=8, dtype=torch.bfloat16)
    svdkern.compress(model, "best", 0.4, calib=windows, batch_size=4, **knobs, **QUIET)
    report = model._svdkern_report
    if knobs:
        assert len(report.refine) == 2 and all(r["after"] <= r["before"] for r in report.refine.values())
    else:
        assert report.tune["held_out_kl_after"] <= report.tune["held_out_kl_before"] and not report.refine
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(windows[:2]).logits.float()).all()


def _whole_model_fisher(model, arch, windows, batch_size):
    """Oracle: one backward of the whole model per micro-batch, hooks on every linear's output."""
    import torch.nn.functional as F

    fisher, handles = {}, []
    for i, layer in enumerate(model.get_submodule(arch.layers_path)):
        for name in (n for g in arch.groups for n in g):
            def hook(_m, _a, out, key=f"{i}.{name}"):
                out.register_hook(lambda g: fisher.__setitem__(
                    key, fisher.get(key, 0) + g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)))
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss * len(ids) / len(windows)).backward()
    for h in handles:
        h.remove()
    return fisher


@pytest.mark.parametrize("model_type", ["llama", "opt", "gemma3_text"])
def test_layer_by_layer_fisher_equals_the_whole_model_backward(model_type, windows):
    from svdkern.sensitivity import output_fisher

    model = tiny_model(model_type, seed=2, layers=3)
    arch = architecture_of(model)
    want = _whole_model_fisher(model, arch, windows[:10], 4)
    model.zero_grad(set_to_none=True)
    store = LayerStore(model.get_submodule(arch.layers_path), "cpu", "cpu")
    with torch.no_grad():
        got = output_fisher(model, store, arch, windows[:10], 4, torch.device("cpu"), torch.device("cpu"), False)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-12 * float(want[key].max()))
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were made


def test_alignment_gives_back_what_rounding_frees_within_the_budget():
    from svdkern.allocation import align_within_budget

    shapes = [MatrixShape("a", 100, 100), MatrixShape("b", 100, 100), MatrixShape("c", 60, 40)]
    ranks = {"a": 30, "b": 29, "c": None}
    budget = total_kept(shapes, ranks)  # 11,800 + the dense 2,400
    # by hand: 8-steps round a and b down to 24, freeing 1,200 + 1,000; one step (1,600) fits, and
    # goes to the matrix rounding took most from (a: 6 ranks)
    assert align_within_budget(shapes, ranks, 8, budget) == ({"a": 32, "b": 24, "c": None}, {"a": 30, "b": 29})
    got, _ = align_within_budget(shapes, ranks, 8, budget - 601)  # now none fits
    assert got == {"a": 24, "b": 24, "c": None}
    got, _ = align_within_budget(shapes, ranks, 8, budget + 1000)  # two steps fit
    assert got == {"a": 32, "b": 32, "c": None}
    # with importances the step goes where its components are worth most: b's
    importance = {"a": torch.ones(100), "b": torch.cat([torch.ones(24), torch.full((76,), 5.0)])}
    got, _ = align_within_budget(shapes, ranks, 8, budget, importance)
    assert got == {"a": 24, "b": 32, "c": None}


@pytest.mark.parametrize("align", ["auto", 8, 16, 64])
def test_aligned_allocation_stays_in_budget_and_leaves_less_than_a_step(align):
    from svdkern.allocation import align_within_budget
    from svdkern.solvers.rank import align_step

    gen = torch.Generator().manual_seed(3)
    shapes = [MatrixShape(f"{i}.{k}", m, n) for i in range(6)
              for k, (m, n) in {"q": (960, 960), "k": (320, 960), "up": (2560, 960), "down": (960, 2560)}.items()]
    for ratio in (0.2, 0.4, 0.6):
        budget = budget_of(shapes, ratio)
        importance = {s.name: torch.rand(min(s.m, s.n), generator=gen).sort(descending=True).values for s in shapes}
        ranks = water_fill(shapes, budget, importance)
        got, before = align_within_budget(shapes, ranks, align, budget, importance)
        spent = total_kept(shapes, got)
        assert spent <= budget
        steps = {n: align_step(r, align) for n, r in ranks.items() if r is not None}
        assert all(got[n] % steps[n] == 0 for n in steps)
        assert set(before) == {n for n in ranks if got[n] != ranks[n]}
        raisable = [s for s in shapes if s.name in steps and steps[s.name] > 1
                    and got[s.name] + steps[s.name] <= break_even_rank(s.m, s.n)]
        assert raisable  # these shapes always leave some: nothing more fits, the budget is used
        assert budget - spent < min(steps[s.name] * (s.m + s.n) for s in raisable)


def _aa_svd_reference_steps(layer, inputs, targets, kwargs, epochs, lr, per_step=1):
    """Oracle: AA-SVD's finetune loop written out (every parameter, AdamW wd 0.01, MSE, 10% warm-up
    from 0 then cosine to 0.1, clip 1, last state), with the rate computed by hand; each step on
    one batch of `per_step` micro-batches put together, as its dataloader's batch."""
    params = list(layer.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    starts = range(0, len(inputs), per_step)
    batches = [(torch.cat(inputs[i:i + per_step]), torch.cat(targets[i:i + per_step]), kwargs[i]) for i in starts]
    total = epochs * len(batches)
    warmup = int(0.1 * total)
    step = 0
    for _ in range(epochs):
        for x, y, kw in batches:
            if step < warmup:
                factor = step / warmup
            else:
                factor = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * factor
            opt.zero_grad()
            torch.nn.functional.mse_loss(run_layer(layer, x, kw), y).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
    for p in params:
        p.requires_grad_(False)


@pytest.mark.parametrize("per_step", [1, 2])
def test_aa_svd_refinement_recipe_matches_its_loop_written_out(windows, per_step):
    """Also with two micro-batches of 4 windows per step (3 micro-batches: steps of 8 and 4 windows)."""
    from svdkern.refine import RECIPES

    model = tiny_model("qwen2", seed=4)  # q/k/v biases, two norms: every parameter trains
    dense = copy.deepcopy(model)
    svdkern.compress(model, "svd-llm", 0.4, calib=windows, progress=False, log=lambda *_: None)
    arch = architecture_of(model)
    inputs = capture_layer_inputs(model, model.get_submodule(arch.layers_path), windows, 4, "cpu", "cpu")
    dense_layer = dense.get_submodule(arch.layers_path)[0]
    with torch.no_grad():
        targets = [run_layer(dense_layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs[0])]
    layer = model.get_submodule(arch.layers_path)[0]
    want, before = copy.deepcopy(layer), copy.deepcopy(layer)
    _aa_svd_reference_steps(want, inputs.hidden, targets, inputs.kwargs[0], epochs=4, lr=3e-3, per_step=per_step)
    refine_block(layer, run_layer, inputs.hidden, targets, inputs.kwargs[0], epochs=4, lr=3e-3, holdout=0,
                 device="cpu", recipe=RECIPES["aa-svd"], accumulate=per_step)
    got, ref = dict(layer.named_parameters()), dict(want.named_parameters())
    assert all(not torch.equal(ref[n], p) for n, p in before.named_parameters())  # norms, biases too
    for name in ref:  # k_proj's bias barely has a gradient (softmax ignores it): Adam scales up rounding
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5 if "k_proj.bias" in name else 1e-6,
                                   msg=name)


def test_aa_svd_preset_steps_once_per_32_windows():
    """AA-SVD steps once per dataloader batch of 32 windows: 40 windows in micro-batches of 8 make
    2 steps per epoch (32 + 8 windows), not 5."""
    from svdkern.pipeline import compress_model
    from svdkern.presets import config_for

    model = tiny_model("llama", seed=4)
    calib = torch.randint(0, 128, (40, 16), generator=torch.Generator().manual_seed(2))
    report = compress_model(model, calib, config_for("aa-svd", 0.4, refine_epochs=3), batch_size=8,
                            progress=False, log=lambda *_: None)
    assert report.refine and all(r["steps"] == 3 * 2 for r in report.refine.values())


def test_aa_svd_refinement_keeps_its_last_state_even_when_worse(windows):
    """AA-SVD's recipe has no selection: a step size that makes things worse stays worse
    (svdkern's recipe keeps its best held-out state instead)."""
    from svdkern.refine import RECIPES

    model = tiny_model("llama", seed=4)
    dense = copy.deepcopy(model)
    svdkern.compress(model, "svd-llm", 0.4, calib=windows, progress=False, log=lambda *_: None)
    arch = architecture_of(model)
    inputs = capture_layer_inputs(model, model.get_submodule(arch.layers_path), windows, 4, "cpu", "cpu")
    with torch.no_grad():
        targets = [run_layer(dense.get_submodule(arch.layers_path)[0], h, kw)
                   for h, kw in zip(inputs.hidden, inputs.kwargs[0])]
    results = {}
    for recipe in ("aa-svd", "svdkern"):
        layer = copy.deepcopy(model.get_submodule(arch.layers_path)[0])
        results[recipe] = refine_block(layer, run_layer, inputs.hidden, targets, inputs.kwargs[0], epochs=2,
                                       lr=1.0, holdout=1, device="cpu", recipe=RECIPES[recipe])
    assert results["aa-svd"].after > results["aa-svd"].before and results["aa-svd"].steps == 2 * 2
    assert results["svdkern"].after <= results["svdkern"].before


def test_water_fill_takes_the_dense_step_by_the_tail_importance_per_parameter():
    """Hand-computed: two 10×10 matrices (break-even rank 4, each step 20 parameters). Both climb
    to rank 4 (gains 8, 7, 6.5 and 8, 7, 6 per 20), then one 20-parameter step is left: going
    dense gains the rest of the spectrum, 5.4 for a (six 0.9s) and 5 for b (one 5), so a goes
    dense and b stays at 4."""
    shapes = [MatrixShape("a", 10, 10), MatrixShape("b", 10, 10)]
    a = torch.tensor([9.0, 8, 7, 6.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    b = torch.tensor([9.0, 8, 7, 6, 5, 0, 0, 0, 0, 0])
    assert break_even_rank(10, 10) == 4
    assert water_fill(shapes, 180, {"a": a, "b": b}) == {"a": None, "b": 4}
    assert water_fill(shapes, 179, {"a": a, "b": b}) == {"a": 4, "b": 4}  # the step does not fit
    assert water_fill(shapes, 180, {"a": a, "b": b}, min_rank={"b": 4}) == {"a": None, "b": 4}
    assert water_fill(shapes, 100, {"a": a, "b": b}, min_rank={"b": 3}) == {"a": 2, "b": 3}  # floor kept


def test_a_full_rank_floor_gives_the_uniform_ranks(windows):
    """min_rank_fraction = 1: every matrix at least its uniform rank, within the uniform budget:
    exactly the uniform ranks, whatever the measured sensitivity says."""
    model = tiny_model("llama", seed=5)
    got = _allocation(model, windows, layer_policy="sensitivity", min_rank_fraction=1.0, rank_align=1)
    shapes = matrix_shapes(model.model.layers, architecture_of(model))
    assert got == uniform_ranks(shapes, 0.5)


def test_fisher_weighted_importance_is_sigma_squared_times_the_weighted_left_vectors(windows):
    """Spectrum.weighted[j] = σ_j²·Σ_i f_i u_ij² for W·P: recomputed here with another square root
    of H (symmetric, from eigh: W·P's σ and U do not depend on which), on the dense inputs."""
    from svdkern.sensitivity import whitened_spectra

    model = tiny_model("llama", seed=3)
    arch = architecture_of(model)
    layers, cpu = model.model.layers, torch.device("cpu")
    cfg = config_for("svd-llm", 0.5)
    inputs = capture_layer_inputs(model, layers, windows, 4, cpu, cpu)
    gen = torch.Generator().manual_seed(0)
    fisher = {f"{i}.{n}": torch.rand(layers[i].get_submodule(n).out_features, generator=gen, dtype=torch.float64)
              for i in range(len(layers)) for g in arch.groups for n in g}
    with torch.no_grad():
        spectra = whitened_spectra(LayerStore(layers, "cpu", "cpu"), arch, inputs.hidden, inputs.kwargs, cfg,
                                   cpu, cpu, fisher, False)
    grams = {}

    def add_gram(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        grams[name] = grams.get(name, 0) + x.T @ x

    hooks = [m.register_forward_pre_hook(lambda _m, a, name=name: add_gram(name, a[0]))
             for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            model(windows[start:start + 4])
    for h in hooks:
        h.remove()
    for key, spectrum in spectra.items():
        H = grams[key] / spectrum.tokens
        H = H + 1e-6 * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)  # the damping whiten adds
        evals, Q = torch.linalg.eigh(H)
        W = layers.get_submodule(key).weight.detach().double()
        U, S, _ = torch.linalg.svd(W @ (Q * evals.sqrt()) @ Q.T, full_matrices=False)
        want = S ** 2 * (U ** 2 * fisher[key][:, None]).sum(0)
        torch.testing.assert_close(spectrum.weighted[:8], want[:8], rtol=1e-6, atol=0)
        torch.testing.assert_close(spectrum.sigma2[:8], (S ** 2)[:8], rtol=1e-6, atol=0)
