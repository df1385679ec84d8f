"""The per-matrix math against its known optima (METHODS.md §7b oracles 1-7)."""
import math

import pytest
import torch

from svdkern.solvers.aces import aces_beta, aces_coefficients
from svdkern.solvers.factorize import factorize, target, visible_delta
from svdkern.solvers.rank import (RatioError, check_saves_parameters, plc_candidates,
                                  rank_for_ratio, residual_rank)
from svdkern.solvers.whiten import Whitener, whiten



@pytest.fixture(autouse=True)
def float64_default():
    """float64 inside this module's tests only (a module-level switch would leak to every test)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def problem(m=23, n=17, N=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    # correlated inputs with a wide spectrum, like real activations
    X = torch.randn(n, n, generator=g) @ torch.randn(n, N, generator=g)
    return W, X


def test_truncation_loss_identity():
    W, X = problem()
    wh = whiten(X @ X.T, damp_rel=0.0)
    k = 6
    U, V = factorize(W, wh, k)
    s = torch.linalg.svdvals(target(W, wh))
    loss = torch.linalg.norm(W @ X - U @ V @ X) ** 2
    assert loss == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-8)
    # and it is the optimum: any other rank-k product does worse
    Ur, Vr = U + 1e-3 * torch.randn_like(U), V + 1e-3 * torch.randn_like(V)
    assert torch.linalg.norm(W @ X - Ur @ Vr @ X) ** 2 > loss


def test_whitening_invariance_cholesky_eigh_sqrt():
    W, X = problem(seed=1)
    H = X @ X.T
    chol = whiten(H, "cholesky", damp_rel=0.0)
    eig = whiten(H, "eigh", damp_rel=0.0)
    evals, Q = torch.linalg.eigh(H)
    sym = Whitener((Q * evals.sqrt()) @ Q.T, lower=False)
    products = [U @ V for U, V in (factorize(W, wh, 5) for wh in (chol, eig, sym))]
    for p in products[1:]:
        torch.testing.assert_close(p, products[0], rtol=1e-9, atol=1e-9)


def test_eigh_damping_floors_only_the_null_space_relative_to_the_gram():
    """P Pᵀ = H + floor·(I − Π), Π the projection on the inputs' span (by QR, not eigh), and the
    floor relative to the mean eigenvalue: so the factors do not change with the Gram's scale."""
    W, X = problem(N=9)  # 9 samples of 17 features: an 8-dimensional null space
    H, damp = X @ X.T, 1e-3
    Q, _ = torch.linalg.qr(X)
    floor = damp * torch.trace(H) / H.shape[0]
    assert float(torch.linalg.eigvalsh(Q.T @ H @ Q)[0]) > floor  # every direction of the span is above it
    P = whiten(H, "eigh", damp_rel=damp).P
    torch.testing.assert_close(P @ P.T, H + floor * (torch.eye(17) - Q @ Q.T), rtol=1e-9, atol=1e-9 * float(floor))
    products = []
    for scale in (1.0, 1e-6, 1e6):
        U, V = factorize(W, whiten(scale * H, "eigh", damp_rel=damp), 5)
        products.append(U @ V)
    for p in products[1:]:
        torch.testing.assert_close(p, products[0], rtol=1e-8, atol=1e-8)


def test_cholesky_damping_adds_the_relative_floor_and_agrees_with_eigh_on_a_full_rank_gram():
    W, X = problem()
    H, damp = X @ X.T, 1e-7
    wh = whiten(H, "cholesky", damp_rel=damp)
    shift = damp * torch.trace(H) / H.shape[0]
    torch.testing.assert_close(wh.P @ wh.P.T, H + shift * torch.eye(17), rtol=1e-10, atol=1e-10 * float(shift))
    assert float(torch.linalg.eigvalsh(H)[0]) > 1e3 * float(shift)  # the floor hardly touches this Gram
    chol, eig = (factorize(W, whiten(H, method, damp_rel=damp), 5) for method in ("cholesky", "eigh"))
    torch.testing.assert_close(chol[0] @ chol[1], eig[0] @ eig[1], rtol=1e-5, atol=1e-6)


def two_streams(seed=2, m=19, n=13, N=77):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    Xf = torch.randn(n, n, generator=g) @ torch.randn(n, N, generator=g)
    Xh = Xf + 0.3 * torch.randn(n, N, generator=g)  # the compressed model's inputs drift
    H = Xh @ Xh.T
    D = (Xf - Xh) @ Xh.T
    return W, Xf, Xh, H, D


def test_beta_zero_is_the_whitened_truncation_and_beta_moves_it():
    """β = 0 is SC-SVD-LLM: the best rank-k fit in the Ĥ metric, computed here through H^{1/2}."""
    W, _, _, H, D = two_streams()
    wh = whiten(H, damp_rel=0.0)
    evals, Q = torch.linalg.eigh(H)
    root, inv_root = (Q * evals.sqrt()) @ Q.T, (Q / evals.sqrt()) @ Q.T
    U, s, Vh = torch.linalg.svd(W @ root, full_matrices=False)
    want = (U[:, :4] * s[:4]) @ Vh[:4] @ inv_root
    U0, V0 = factorize(W, wh, 4, delta=D, beta=0.0)
    torch.testing.assert_close(U0 @ V0, want, rtol=1e-9, atol=1e-9)
    U1, V1 = factorize(W, wh, 4, delta=D, beta=0.5)
    assert float((U1 @ V1 - want).norm() / want.norm()) > 1e-2  # Δ is used once β > 0


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_ep_equals_explicit_corrected_weight(alpha):
    W, _, _, H, D = two_streams()
    wh = whiten(H, damp_rel=1e-4)
    n = H.shape[0]
    H_damped = H + wh.damp * H.diagonal().mean() * torch.eye(n)
    W_star = W + alpha * W @ D @ torch.linalg.inv(H_damped)
    Ue, Ve = factorize(W_star, wh, 4)
    U, V = factorize(W, wh, 4, delta=D, beta=alpha)
    torch.testing.assert_close(U @ V, Ue @ Ve, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0])
def test_cealc_beats_perturbed_and_sequential_solutions(alpha):
    W, Xf, Xh, H, D = two_streams(seed=3)
    beta = alpha / (1 + alpha)
    wh = whiten(H, damp_rel=0.0)

    def objective(M):
        return float(torch.linalg.norm((M - W) @ Xh) ** 2 + alpha * torch.linalg.norm(M @ Xh - W @ Xf) ** 2)

    U, V = factorize(W, wh, 4, delta=D, beta=beta)
    best = objective(U @ V)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dU = torch.randn(U.shape, generator=g) * 1e-3 * U.norm()
        dV = torch.randn(V.shape, generator=g) * 1e-3 * V.norm()
        assert objective((U + dU) @ (V + dV)) > best
    Us, Vs = factorize(W, wh, 4)  # SC-SVD-LLM ignores the FP stream
    assert objective(Us @ Vs) > best


def test_rec_with_same_metric_equals_plain_rank_r():
    W, _ = problem(seed=4)
    identity = Whitener(torch.eye(W.shape[1]), lower=True)
    U, V = factorize(W, identity, 7, residual=3)
    Ur, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(U @ V, (Ur[:, :7] * S[:7]) @ Vh[:7], rtol=1e-9, atol=1e-9)


def test_rec_weight_error_no_worse_than_svd_llm_at_same_rank():
    """ERC Thm 3: ‖W − Ŵ_REC‖_F ≤ ‖W − Ŵ_SVD-LLM‖_F, and the activation error goes the other way."""
    for seed in range(5):
        W, X = problem(seed=seed)
        wh = whiten(X @ X.T, damp_rel=0.0)
        Ur, Vr = factorize(W, wh, 8, residual=2)
        Us, Vs = factorize(W, wh, 8)
        assert torch.linalg.norm(W - Ur @ Vr) <= torch.linalg.norm(W - Us @ Vs) + 1e-9
        assert torch.linalg.norm((W - Ur @ Vr) @ X) >= torch.linalg.norm((W - Us @ Vs) @ X) - 1e-9


def test_aces_closed_form_matches_grid_search_and_the_true_optimum():
    g = torch.Generator().manual_seed(5)
    picks = set()
    for t in range(40):
        W, _, _, H, D = two_streams(seed=100 + t)
        wh = whiten(H, damp_rel=1e-6)
        S = target(W, wh)
        Dw = wh.right_inv_t(W @ D) * float(torch.rand(1, generator=g) * 4)
        coef = aces_coefficients(S, Dw, 4)
        beta = aces_beta(coef, (0.25, 0.75))
        grid = torch.linspace(0.25, 0.75, 20001)
        assert coef.ratio(beta) <= float(coef.ratio(grid).min()) + 1e-12

        def true_tail(b):
            s = torch.linalg.svdvals(S + b * Dw)
            return float((s[4:] ** 2).sum() / (s ** 2).sum())

        # ρ̃ is first order, yet its β lands within 0.2% of the true tail's optimum (worst seen: 0.08%)
        true_best = min(true_tail(float(b)) for b in torch.linspace(0.25, 0.75, 101))
        assert true_tail(beta) <= 1.002 * true_best
        picks.add("low end" if beta == 0.25 else "high end" if beta == 0.75 else "interior")
    assert picks == {"low end", "high end", "interior"}  # so no fixed β passes


def test_aces_coefficients_are_the_frobenius_products():
    W, _, _, H, D = two_streams(seed=7)
    wh = whiten(H)
    S, Dw = target(W, wh), wh.right_inv_t(W @ D)
    coef = aces_coefficients(S, Dw, 3)
    s = torch.linalg.svdvals(S)  # ρ̃ is exact at β = 0 by construction
    assert coef.ratio(0.0) == pytest.approx(float((s[3:] ** 2).sum() / (s ** 2).sum()), rel=1e-10)
    assert coef.A == pytest.approx(float((S ** 2).sum()))
    assert coef.C == pytest.approx(float((Dw ** 2).sum()))


@pytest.mark.parametrize("m,n,ratio,k", [
    (4096, 4096, 0.2, 1638), (11008, 4096, 0.2, 2388), (4096, 11008, 0.2, 2388),
    (1024, 4096, 0.2, 655), (576, 576, 0.2, 230), (192, 576, 0.2, 115), (1536, 576, 0.2, 335)])
def test_rank_for_ratio_known_values(m, n, ratio, k):
    assert rank_for_ratio(m, n, ratio) == k


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_ratio_out_of_range_is_rejected(ratio):
    with pytest.raises(RatioError, match="between 0 and 1"):
        rank_for_ratio(64, 64, ratio)


def test_rank_too_small_and_not_saving_are_rejected():
    with pytest.raises(RatioError, match="rank 0"):
        rank_for_ratio(4, 3, 0.9)
    with pytest.raises(RatioError, match="would not save parameters"):
        check_saves_parameters(10, 10, 5)


def test_residual_rank_and_plc_candidates():
    assert residual_rank(4096, 4096, 1638, 0.05) == 102
    assert residual_rank(11008, 4096, 2388, 0.05) == 149
    assert residual_rank(8, 8, 1, 0.5) == 0  # would leave stage 1 empty
    # METHODS §6.2: N = 32, R = 0.6 -> first feasible even k is 22, and k = N is included
    assert plc_candidates(32, 0.6, 2, 0.05) == [22, 24, 26, 28, 30, 32]
    with pytest.raises(RatioError, match="no PLC layer count"):
        plc_candidates(4, 0.97, 2, 0.05)


def test_heldout_output_error_matches_the_samples_it_summarizes():
    from svdkern.solvers.select import heldout_output_error

    gen = torch.Generator().manual_seed(11)
    m, n, r, t = 7, 9, 3, 500
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    U = torch.randn(m, r, generator=gen, dtype=torch.float64)
    V = torch.randn(r, n, generator=gen, dtype=torch.float64)
    x_hat = torch.randn(t, n, generator=gen, dtype=torch.float64)
    x_fp = x_hat + 0.3 * torch.randn(t, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = x_hat.T @ x_hat / t
    D = (x_fp - x_hat).T @ x_hat / t          # rows δ, columns x̂: the CrossStats orientation
    direct = ((x_fp @ W.T - x_hat @ V.T @ U.T) ** 2).sum(1).mean() - ((x_fp @ W.T) ** 2).sum(1).mean()
    assert heldout_output_error(W, U, V, H, D) == pytest.approx(float(direct), rel=1e-10)


def test_select_beta_follows_what_generalizes():
    """Compensation wins when the held-out shift is the fitted one, loses when it was noise."""
    from svdkern.solvers.select import select_beta
    from svdkern.solvers.whiten import whiten

    gen = torch.Generator().manual_seed(12)
    m, n, t = 12, 10, 400
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)

    def stats(shift):
        x_hat = torch.randn(t, n, generator=gen, dtype=torch.float64)
        return x_hat.T @ x_hat / t, (x_hat @ shift).T @ x_hat / t

    H_fit, D_fit = stats(0.5 * mix)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    H_same, D_same = stats(0.5 * mix)
    beta, errors = select_beta(W, whiten(H_fit), D_fit, H_same, D_same, 4, 0, grid)
    assert beta == 1.0 and errors[1.0] < errors[0.0]
    H_none, D_none = stats(torch.zeros(n, n, dtype=torch.float64))
    beta, _ = select_beta(W, whiten(H_fit), D_fit, H_none, D_none, 4, 0, grid)
    assert beta == 0.0


def test_visible_delta_drops_what_the_gram_cannot_see():
    """H = diag(4, 0): Δ's second column (a direction no input takes) goes, the first is kept
    up to the ridge's λ/(λ + μ·mean diag H) = 4/(4 + 0.1·2)."""
    H = torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64))
    delta = torch.tensor([[1.0, 5.0], [2.0, -3.0]], dtype=torch.float64)
    got = visible_delta(delta, H, 0.1)
    want = torch.tensor([[4 / 4.2, 0.0], [8 / 4.2, 0.0]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 7, generator=g, dtype=torch.float64)
    D = torch.randn(7, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(visible_delta(D, X.T @ X, 1e-12), D, atol=1e-8)  # full rank: nothing to drop
    assert torch.allclose(visible_delta(D, 1e3 * X.T @ X, 1e-2), visible_delta(D, X.T @ X, 1e-2))  # scale-free
