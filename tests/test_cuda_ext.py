"""The compiled CUDA ops against the PyTorch fallback and the fp64 oracle (GPU only).

On CPU machines these skip; CI still compiles csrc/ with nvcc (`.ci/run`, CMakeLists.txt).
"""
import importlib.util
import os

import pytest
import torch

import svdkern
from svdkern.backends import torch_ops
from svdkern.reference import cross_ref, damped_cholesky_ref, gram_ref
from svdkern.solvers.whiten import NotPositiveDefiniteError, symmetrize

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and svdkern.has_cuda_ext()),
                                reason="needs a CUDA GPU and the compiled extension")


@pytest.fixture(autouse=True, scope="module")
def short_autotuning():
    """The compressions below run the Triton kernels at many small new shapes: autotune each for a
    few ms, not Triton's 25 + 100, in this module only (setting and autotuners restored after it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDKERN_AUTOTUNE_MS", os.environ.get("SVDKERN_AUTOTUNE_MS", "2,10"))
        if importlib.util.find_spec("triton"):
            from svdkern.backends import triton_lowrank

            mp.setattr(triton_lowrank, "_tuned_kernels", {})
        yield


@pytest.fixture(autouse=True, params=["ext", "blas"])
def gram_path(request, monkeypatch):
    """Both CUDA Gram paths: the hand kernels and blocked cuBLAS (bf16 products, fp32 output)."""
    monkeypatch.setenv("SVDKERN_GRAM", request.param)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tokens,n", [(1, 1), (37, 17), (1000, 130), (2049, 577)])
def test_gram_kernel_matches_fallback_and_oracle(dtype, acc, tokens, n):
    g = torch.Generator().manual_seed(tokens * 1000 + n)
    X = torch.randn(tokens, n, generator=g).to("cuda", dtype)
    H = torch.zeros(n, n, device="cuda", dtype=acc)
    svdkern.gram_accumulate(H, X)
    H_fb = torch.zeros(n, n, device="cuda", dtype=acc)
    torch_ops.gram_accumulate(H_fb, X)
    ref = gram_ref(X.cpu())
    err = (symmetrize(H.double()).cpu() - ref).abs().max()
    err_fb = (symmetrize(H_fb.double()).cpu() - ref).abs().max()
    # any fp32 summation order may lose ~sqrt(tokens) roundings of the largest |x_i||x_j| sums
    Xa = X.double().abs().cpu()
    order = 4 * tokens ** 0.5 * torch.finfo(torch.float32).eps * float((Xa.T @ Xa).max())
    assert err <= 2 * err_fb + (order if acc == torch.float32 else 1e-9 * float(ref.abs().max()))


def test_cross_kernel_matches_oracle():
    d, X = torch.randn(2, 300, 129, device="cuda").bfloat16().unbind(0)
    D = torch.zeros(129, 129, device="cuda")
    svdkern.cross_accumulate(D, d, X)
    ref = cross_ref(d.cpu(), X.cpu())
    assert (D.double().cpu() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("n", [7, 130, 1025])
def test_whiten_kernel_matches_oracle_and_damps_per_member(n):
    X = torch.randn(3, 2 * n + 3, n, device="cuda", dtype=torch.float64)
    H = X.transpose(1, 2) @ X
    H[2] = H[2][:, :1] @ H[2][:1, :]  # rank one: needs damping
    L, damp = svdkern.cholesky_whiten(H, 1e-6)
    assert damp[0] == 1e-6 and damp[1] == 1e-6 and (n == 1 or damp[2] > 1e-6)
    for i in range(3):
        torch.testing.assert_close(L[i].cpu(), damped_cholesky_ref(H[i].cpu(), float(damp[i])), rtol=1e-8, atol=1e-8)


def test_whiten_kernel_raises_when_hopeless():
    with pytest.raises((NotPositiveDefiniteError, RuntimeError), match="non-positive-definite"):
        svdkern.cholesky_whiten(-torch.eye(5, device="cuda", dtype=torch.float64))


def test_opcheck_on_cuda():
    X = torch.randn(40, 33, device="cuda")
    torch.library.opcheck(torch.ops.svdkern.gram_accumulate.default, (torch.zeros(33, 33, device="cuda"), X))
    torch.library.opcheck(torch.ops.svdkern.cross_accumulate.default, (torch.zeros(33, 33, device="cuda"), X, X.flip(0)))
    H = (X.T @ X).double() + torch.eye(33, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.svdkern.cholesky_whiten.default, (H, 1e-6, 1e-2))


def test_pipeline_on_gpu_matches_cpu_fallback(windows):
    from conftest import tiny_model

    gpu, cpu = tiny_model("llama", seed=7).cuda(), tiny_model("llama", seed=7)
    quiet = dict(progress=False, log=lambda *_: None)
    svdkern.compress(gpu, "ep-svd-llm", 0.3, calib=windows, **quiet)
    svdkern.compress(cpu, "ep-svd-llm", 0.3, calib=windows, **quiet)
    with torch.no_grad():
        a, b = gpu(windows.cuda()).logits.cpu(), cpu(windows).logits
    assert float((a - b).norm() / b.norm()) < 1e-3


@pytest.mark.parametrize("method", ["sc-svd-llm", "ep-svd-llm", "saes-svd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_models_compress_on_gpu(method, dtype, windows):
    """The two-stream statistics meet half-precision activations (issue 10, defect 1)."""
    from conftest import tiny_model

    gpu = tiny_model("llama", seed=7).to("cuda", dtype)
    cpu = tiny_model("llama", seed=7).to(dtype).float()  # the same rounded weights, fp32 math
    quiet = dict(progress=False, log=lambda *_: None)
    svdkern.compress(gpu, method, 0.3, calib=windows, **quiet)
    svdkern.compress(cpu, method, 0.3, calib=windows, **quiet)
    with torch.no_grad():
        a, b = gpu(windows.cuda()).logits.float().cpu(), cpu(windows).logits
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 0.05  # half-precision activations, same factors' math
