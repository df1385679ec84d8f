"""Pure-PyTorch implementations of every op: the fallback on any device, and CI's path."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gram import NotPositiveDefiniteError

# Column-block width for the triangular Gram update: lower blocks only, ~0.6x the flops' time of
# a full XᵀX on a 2-core CPU for n=1536 (measured), and the same on GPUs for large n.
_GRAM_BLOCK = 256


def lowrank_linear(x, U, V, bias=None):
    return F.linear(F.linear(x, V), U, bias)


def gram_accumulate(H, X):
    """H[lower] += (XᵀX)[lower]; the strict upper triangle of H is not maintained.

    Half-precision X on CUDA with an fp32 H: tensor-core products with fp32 output
    (`mm(..., out_dtype=float32)`: a product of two bf16/fp16 values is exact in fp32, so this
    loses nothing against casting X to fp32 first, at the bf16 tensor-core rate).
    """
    X = X.reshape(-1, X.shape[-1])
    half_products = (X.is_cuda and X.dtype in (torch.float16, torch.bfloat16) and H.dtype == torch.float32
                     and hasattr(torch.ops.aten.mm, "dtype"))
    if not half_products:
        X = X.to(H.dtype)
    n = X.shape[1]
    for start in range(0, n, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, n)
        if half_products:
            H[start:stop, :stop] += torch.mm(X[:, start:stop].T, X[:, :stop], out_dtype=torch.float32)
        else:
            H[start:stop, :stop].addmm_(X[:, start:stop].T, X[:, :stop])


def cross_accumulate(D, delta, X):
    """D += δᵀX (not symmetric: every entry is maintained)."""
    D.addmm_(delta.reshape(-1, delta.shape[-1]).to(D.dtype).T, X.reshape(-1, X.shape[-1]).to(D.dtype))


def cholesky_whiten(H, damp_rel=1e-6, max_damp_rel=1e-2):
    """Batched damped Cholesky with per-member escalation (x10 per round), in float64.

    Returns (L, damp): lower factors of H + damp*mean(diag H)*I and the damp each member needed.
    One host sync per damping round (the info check), never one per matrix.
    """
    H = H.to(torch.float64)
    batch_shape = H.shape[:-2]
    Hb = H.reshape(-1, *H.shape[-2:])
    n = Hb.shape[-1]
    scale = Hb.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    damp = torch.full((Hb.shape[0],), float(damp_rel), dtype=torch.float64, device=H.device)
    L = torch.empty_like(Hb)
    todo = torch.arange(Hb.shape[0], device=H.device)
    idx = torch.arange(n, device=H.device)
    while True:
        Hd = Hb[todo].clone()
        Hd[:, idx, idx] += (damp[todo] * scale[todo])[:, None]
        Lt, info = torch.linalg.cholesky_ex(Hd)
        ok = (info == 0) & torch.isfinite(Lt).flatten(1).all(1)
        L[todo[ok]] = Lt[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return L.reshape(H.shape), damp.reshape(batch_shape)
        damp[todo] = torch.where(damp[todo] > 0, damp[todo] * 10.0, 1e-12)
        if bool((damp[todo] > max_damp_rel * (1 + 1e-9)).any()):
            raise NotPositiveDefiniteError(
                f"{todo.numel()} Gram matrix(es) stay non-positive-definite even with damping "
                f"{max_damp_rel:g} x mean(diag); the calibration data may be degenerate (too few "
                "tokens, or constant inputs). Raise nsamples/seqlen or max damping."
            )
