"""End-to-end tuning (tune.py) and the chunked head (head.py), against independent oracles."""
import os

import pytest
import torch
import torch.nn.functional as F

import svdkern
import svdkern.head as head
import svdkern.tune as tune
from svdkern.models import architecture_of

from conftest import tiny_model

QUIET = dict(progress=False, log=lambda *_: None)
TUNE = dict(tune_epochs=3, tune_lr=3e-3, tune_batch=4, tune_holdout=4, tune_topk=16)  # 16 of 128: a rest bucket


@pytest.fixture
def small_chunks(monkeypatch):
    """16-token chunks of the tiny models' 128-token vocabulary: every pass runs several chunks."""
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 128 * 16)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt", "gemma2", "gemma3_text"])
def test_chunked_head_gives_the_models_logits(model_type, windows, small_chunks):
    model = tiny_model(model_type, seed=3)
    if model_type == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capping branch is exercised
    ids = windows[:3]
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.double()
        hidden = head.final_hidden(model, ids)
        got = head.head_logits(model, hidden).double()
        total = head.chunked_sum(model, hidden, lambda logits: logits.double().sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.double(), want.sum(), rtol=1e-4, atol=1e-3)


def _kl_float64(p_logits, q_logits, k):
    """Oracle: KL(p ‖ q) between the (k + 1)-bucket coarsenings (p's top k tokens and the rest)."""
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    top = p.topk(k, -1).indices
    pk, qk = p.gather(-1, top), q.gather(-1, top)
    kl = (pk * (pk.log() - qk.log())).sum(-1)
    if k == p.shape[-1]:  # no rest bucket
        return kl.sum()
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    return (kl + pr * (pr.log() - qr.log())).sum()


@pytest.mark.parametrize("k", [1, 7, 50])
def test_bucket_kl_against_float64(k):
    gen = torch.Generator().manual_seed(k)
    p_logits, q_logits = torch.randn(2, 9, 50, generator=gen) * 3, torch.randn(2, 9, 50, generator=gen) * 3
    ids, logp, rest = tune.top_buckets(p_logits, k)
    got = tune.bucket_kl(q_logits, ids, logp, rest)
    torch.testing.assert_close(got.double(), _kl_float64(p_logits, q_logits, k), rtol=1e-4, atol=1e-5)
    if k == 50:  # the whole vocabulary: the plain KL
        want = F.kl_div(torch.log_softmax(q_logits.double(), -1), torch.log_softmax(p_logits.double(), -1),
                        log_target=True, reduction="sum")
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dense_targets_are_the_dense_models_top_tokens(windows, small_chunks):
    from svdkern.blocks import capture_layer_inputs
    from svdkern.layer_store import LayerStore

    model = tiny_model("qwen2", seed=4)
    layers = model.get_submodule(architecture_of(model).layers_path)
    inputs = capture_layer_inputs(model, layers, windows, 5, "cpu", "cpu")
    got = tune.dense_targets(model, LayerStore(layers, "cpu", "cpu"), inputs, windows, 6, 5, "cpu", "cpu", False)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows, use_cache=False).logits.double(), -1)
    assert got.index == list(range(len(windows)))
    top = logp.topk(6, -1)
    assert torch.equal(got.ids, top.indices)
    torch.testing.assert_close(got.logp.double(), top.values, rtol=1e-5, atol=1e-5)
    rest = (1 - top.values.exp().sum(-1)).log()
    torch.testing.assert_close(got.rest.double(), rest, rtol=1e-4, atol=1e-4)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dense(dtype=torch.float32):
    return tiny_model("qwen2", seed=5, layers=3).to(dtype)  # non-zero q/k/v biases: a trained bias shows


def _compress(windows, ckpt=None, dtype=torch.float32, **knobs):
    model = _dense(dtype)
    svdkern.compress(model, "svd-llm", 0.4, calib=windows, batch_size=4, checkpoint_dir=ckpt, **knobs, **QUIET)
    return model


@pytest.fixture
def calib():
    return torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("norms", [False, True])
def test_tuning_lowers_the_held_out_kl_and_trains_only_what_it_says(calib, norms):
    untuned = _compress(calib)
    tuned = _compress(calib, **TUNE, tune_norms=norms)
    result = tuned._svdkern_report.tune
    assert result["held_out_kl_after"] < result["held_out_kl_before"]
    assert result["kept_epoch"] >= 1 and len(result["history"]) == TUNE["tune_epochs"]
    # the held-out KL it reports is the kept model's: recompute it from scratch
    targets = _targets(_dense(), calib, TUNE["tune_topk"])
    held = range(len(calib) - TUNE["tune_holdout"], len(calib))
    with torch.no_grad():
        kl = sum(float(tune.window_kl(tuned, calib[w], targets.of(w), "cpu")) for w in held) / len(held)
    assert kl == pytest.approx(result["held_out_kl_after"], rel=1e-4)
    before, after = _params(untuned), _params(tuned)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    factors = {n for n in before if n.endswith((".U", ".V"))}
    assert factors and changed >= factors  # every factor moved
    trainable_extra = {n for n in before if norms and (n.endswith("bias") and ".self_attn." in n or "norm" in n)
                       and n.startswith("model.layers.")}
    assert changed - factors == trainable_extra  # embeddings, lm_head, final norm never change
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in untuned.named_parameters()}  # frozen again afterwards
    assert all(p.grad is None for p in tuned.parameters())  # no gradient left behind


def _targets(dense, windows, k):
    with torch.no_grad():
        logits = dense(input_ids=windows, use_cache=False).logits
    ids, logp, rest = tune.top_buckets(logits, k)
    return tune.DenseTargets(list(range(len(windows))), ids, logp, rest)


def test_a_diverging_lr_keeps_the_untuned_factors(calib):
    untuned = _compress(calib)
    tuned = _compress(calib, **{**TUNE, "tune_lr": 50.0})
    assert tuned._svdkern_report.tune["kept_epoch"] == 0
    before, after = _params(untuned), _params(tuned)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interrupted_tuning_resumes_exactly(dtype, calib, tmp_path, monkeypatch):
    """bf16: the steps are taken on fp32 master copies, which the checkpoint keeps too."""
    want = _params(_compress(calib, dtype=dtype, **TUNE))
    real, calls = tune._step, [0]

    def interrupting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 7:  # the third epoch's first step (3 steps an epoch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ckpt = str(tmp_path / "ckpt")
    monkeypatch.setattr(tune, "_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _compress(calib, ckpt=ckpt, dtype=dtype, **TUNE)
    assert os.path.exists(os.path.join(ckpt, "tune_state.pt"))
    monkeypatch.setattr(tune, "_step", lambda *a, **k: (calls.append("resumed"), real(*a, **k)))
    targets = []
    monkeypatch.setattr(tune, "dense_targets", lambda *a, **k: targets.append(1))
    resumed = _compress(calib, ckpt=ckpt, dtype=dtype, **TUNE)
    assert calls.count("resumed") == 3 and not targets  # one epoch left; targets read back
    got = _params(resumed)
    assert {p.dtype for p in resumed.parameters()} == {dtype}
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not os.path.exists(ckpt)


def test_a_changed_tuning_setting_is_refused_on_resume(calib, tmp_path, monkeypatch):
    real = tune._step
    monkeypatch.setattr(tune, "_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        _compress(calib, ckpt=ckpt, **TUNE)
    monkeypatch.setattr(tune, "_step", real)
    with pytest.raises(RuntimeError, match="tune_lr 0.003 -> 0.001"):
        _compress(calib, ckpt=ckpt, **{**TUNE, "tune_lr": 1e-3})


def test_tuning_refuses_streaming_from_disk(calib, tmp_path):
    model = tiny_model("llama", seed=1, layers=2)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="cannot stream layers from disk"):
        svdkern.compress_from_disk(str(tmp_path / "src"), str(tmp_path / "out"), "svd-llm", 0.4, calib=calib,
                                   batch_size=4, tune_epochs=1, tune_holdout=4, **QUIET)
    assert not os.path.exists(tmp_path / "out")


def test_tuning_needs_windows_to_hold_out(calib, monkeypatch):
    """Refused before any matrix is solved, not after the whole layer-wise pass."""
    import svdkern.pipeline

    monkeypatch.setattr(svdkern.pipeline, "compress_group",
                        lambda *_a, **_k: pytest.fail("a matrix was solved before the windows were checked"))
    with pytest.raises(ValueError, match="holds out 16 of 16 calibration windows"):
        _compress(calib, tune_epochs=1, tune_holdout=16)


def test_the_trainable_path_computes_what_the_inference_path_does():
    """LowRankLinear with trainable factors (autograd: two F.linear calls) gives the inference
    path's output, bias included, and the bias gets its gradient."""
    gen = torch.Generator().manual_seed(0)
    layer = svdkern.LowRankLinear.from_factors(torch.randn(13, 5, generator=gen), torch.randn(5, 11, generator=gen),
                                               torch.randn(13, generator=gen))
    x = torch.randn(3, 7, 11, generator=gen)
    with torch.no_grad():
        want = layer(x)
    torch.testing.assert_close(want.double(), (x.double() @ layer.V.double().T @ layer.U.double().T
                                               + layer.bias.double()), rtol=1e-5, atol=1e-5)
    layer.requires_grad_(True)
    got = layer(x)
    got.sum().backward()
    torch.testing.assert_close(got.detach(), want)
    torch.testing.assert_close(layer.bias.grad, torch.full((13,), 21.0))


def test_tuning_a_bf16_model_trains_fp32_masters_and_lowers_the_kl(calib):
    tuned = _compress(calib, dtype=torch.bfloat16, **TUNE)
    result = tuned._svdkern_report.tune
    assert result["held_out_kl_after"] < result["held_out_kl_before"] and result["kept_epoch"] >= 1
    assert {p.dtype for p in tuned.parameters()} == {torch.bfloat16}
    assert all(p.grad is None for p in tuned.parameters())
