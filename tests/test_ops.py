"""svdkern's ops (PyTorch path) against float64 oracles on odd shapes, plus opcheck."""
import pytest
import torch

import svdkern
from svdkern.reference import cross_ref, damped_cholesky_ref, gram_ref, lowrank_linear_ref
from svdkern.solvers.whiten import GramNotFiniteError, NotPositiveDefiniteError, symmetrize

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def same_dtype_error(X):
    """What PyTorch itself loses computing XᵀX from these inputs in fp32."""
    Xf = X.float()
    return (Xf.T @ Xf).double() - gram_ref(X)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tokens,n", [(1, 1), (37, 17), (301, 300), (129, 513)])
def test_gram_accumulate_matches_fp64(dtype, acc, tokens, n):
    g = torch.Generator().manual_seed(tokens * n)
    H = torch.zeros(n, n, dtype=acc)
    ref = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(2):  # accumulation across micro-batches
        X = torch.randn(tokens, n, generator=g).to(dtype)
        svdkern.gram_accumulate(H, X)
        ref += gram_ref(X)
    err = (symmetrize(H.double()) - ref).abs().max()
    torch_err = same_dtype_error(X).abs().max() * 2
    assert err <= 2 * torch_err + 1e-9 * ref.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_accumulate_matches_fp64(dtype):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 41, 19, generator=g).to(dtype)
    X = torch.randn(3, 41, 19, generator=g).to(dtype)
    D = torch.zeros(19, 19)
    svdkern.cross_accumulate(D, delta, X)
    ref = cross_ref(delta, X)
    torch_err = ((delta.reshape(-1, 19).float().T @ X.reshape(-1, 19).float()).double() - ref).abs().max()
    assert (D.double() - ref).abs().max() <= 2 * torch_err + 1e-6 * ref.abs().max()


def test_gram_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        svdkern.gram_accumulate(torch.zeros(4, 4), torch.zeros(3, 5))
    with pytest.raises(TypeError, match="float32 or float64"):
        svdkern.gram_accumulate(torch.zeros(4, 4, dtype=torch.float16), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one shape"):
        svdkern.cross_accumulate(torch.zeros(4, 4), torch.zeros(3, 4), torch.zeros(2, 4))


@pytest.mark.parametrize("n", [1, 5, 33, 130])
def test_cholesky_whiten_matches_fp64_oracle(n):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2, 3 * n + 2, n, generator=g, dtype=torch.float64)
    H = X.transpose(1, 2) @ X
    L, damp = svdkern.cholesky_whiten(H, 1e-6)
    assert torch.equal(damp, torch.full((2,), 1e-6, dtype=torch.float64))
    torch.testing.assert_close(L, damped_cholesky_ref(H, 1e-6), rtol=1e-10, atol=1e-10)


def test_cholesky_whiten_damps_only_the_members_that_need_it():
    g = torch.Generator().manual_seed(0)
    good = torch.randn(50, 12, generator=g, dtype=torch.float64)
    low = torch.randn(3, 12, generator=g, dtype=torch.float64)  # rank 3: singular
    H = torch.stack([good.T @ good, low.T @ low - 1e-3 * torch.eye(12, dtype=torch.float64)])
    L, damp = svdkern.cholesky_whiten(H, 1e-6)
    assert damp[0] == 1e-6 and damp[1] > 1e-6
    for i in range(2):
        Hd = H[i] + damp[i] * H[i].diagonal().mean() * torch.eye(12, dtype=torch.float64)
        torch.testing.assert_close(L[i] @ L[i].T, Hd, rtol=1e-9, atol=1e-9)


def test_float32_cholesky_fails_where_damped_fp64_succeeds():
    """The SmolLM2 situation: λmin/λmax ≈ 1e-11 right after RMSNorm."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    H = (Q * torch.logspace(0, -11, 64, dtype=torch.float64)) @ Q.T
    assert torch.linalg.cholesky_ex(H.float()).info.item() != 0
    L, _ = svdkern.cholesky_whiten(H, 1e-6)
    assert torch.isfinite(L).all()


def test_cholesky_whiten_errors():
    H = torch.eye(4, dtype=torch.float64)
    H[1, 1] = float("nan")
    with pytest.raises(GramNotFiniteError, match="NaN or Inf"):
        svdkern.cholesky_whiten(H)
    with pytest.raises(NotPositiveDefiniteError, match="non-positive-definite"):
        svdkern.cholesky_whiten(-torch.eye(4, dtype=torch.float64) + 0.1 * torch.ones(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_lowrank_linear_torch_path_matches_fp64(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    U, V = torch.randn(9, 3, generator=g), torch.randn(3, 5, generator=g)
    b = torch.randn(9, generator=g) if bias else None
    y = svdkern.lowrank_linear(x, U, V, b)
    assert y.shape == (*shape[:-1], 9)
    torch.testing.assert_close(y.double(), lowrank_linear_ref(x, U, V, b), rtol=1e-5, atol=1e-5)


def test_opcheck_every_op():
    g = torch.Generator().manual_seed(0)
    x, U, V, b = (torch.randn(3, 5, generator=g), torch.randn(6, 2, generator=g),
                  torch.randn(2, 5, generator=g), torch.randn(6, generator=g))
    torch.library.opcheck(torch.ops.svdkern.lowrank_linear.default, (x, U, V, b))
    torch.library.opcheck(torch.ops.svdkern.gram_accumulate.default, (torch.zeros(5, 5), x))
    torch.library.opcheck(torch.ops.svdkern.cross_accumulate.default, (torch.zeros(5, 5), x, x.flip(0)))
    H = (x.T @ x + torch.eye(5)).double()
    torch.library.opcheck(torch.ops.svdkern.cholesky_whiten.default, (H, 1e-6, 1e-2))


def test_cross_accumulate_rejects_mixed_dtypes_on_every_backend():
    """The CUDA kernel reads δ and X with one type; the fallback must refuse what it would."""
    D = torch.zeros(5, 5)
    with pytest.raises(TypeError, match="share one dtype"):
        svdkern.cross_accumulate(D, torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_stats_report_one_non_finite_activation(bad):
    """One bad value anywhere (the FP stream's included, even where x̂ is 0) is reported."""
    from svdkern.stats import ActivationNotFiniteError, CrossStats, GramStats

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, 19, generator=g)
    ok = GramStats(19, name="mlp.up_proj")
    ok.add(x)
    ok.mean()
    x[1, 20, 7] = bad
    gram = GramStats(19, name="mlp.up_proj")
    gram.add(x[:2])
    gram.add(x[2:])
    with pytest.raises(ActivationNotFiniteError, match="mlp.up_proj"):
        gram.mean()
    x_hat = torch.randn(2, 37, 19, generator=g)
    x_fp = x_hat.clone()
    x_hat[0, 5, 11] = 0.0
    x_fp[0, 5, 11] = bad
    cross = CrossStats(19, name="self_attn.o_proj")
    cross.add(x_fp, x_hat)
    with pytest.raises(ActivationNotFiniteError, match="self_attn.o_proj"):
        cross.mean()


def test_gram_path_choice_is_checked(monkeypatch):
    from svdkern.backends import gram_impl

    assert gram_impl() in ("blas", "ext")
    monkeypatch.setenv("SVDKERN_GRAM", "cublas")
    with pytest.raises(ValueError, match="SVDKERN_GRAM must be blas or ext"):
        gram_impl()
