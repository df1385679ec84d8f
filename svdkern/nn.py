"""LowRankLinear: a drop-in for nn.Linear that stores W ≈ U V and computes U(Vx) + b; warm_up."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import use_triton_lowrank
from .models import set_submodule


class LowRankLinear(nn.Module):
    """y = U (V x) + b with U (out_features × rank) and V (rank × in_features).

    The eager forward calls the Triton launcher directly on CUDA (no dispatcher overhead at
    decode); with autograd active it uses two F.linear calls so gradients flow (fine-tuning).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1; got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        # Frozen by default: a compressed model is for inference, and a trainable factor would
        # send every call made outside no_grad down the unfused path. requires_grad_(True) to tune.
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False)
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype=None) -> "LowRankLinear":
        if U.shape[1] != V.shape[0]:
            raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} disagree on the rank")
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, U.device, dtype)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.U.requires_grad):
            return F.linear(F.linear(x, self.V), self.U, self.bias)
        if torch.compiler.is_compiling():  # an opaque op (with its fake) for graphs and inductor
            return torch.ops.svdkern.lowrank_linear(x, self.U, self.V, self.bias)
        if use_triton_lowrank(x):
            from .backends.triton_lowrank import lowrank_linear

            return lowrank_linear(x, self.U, self.V, self.bias)
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def padded_to(self, rank: int) -> "LowRankLinear":
        """The same map stored at a larger rank (zero columns of U, zero rows of V: exact)."""
        if rank < self.rank:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        extra = rank - self.rank
        U = torch.cat([self.U.detach(), self.U.new_zeros(self.out_features, extra)], 1)
        V = torch.cat([self.V.detach(), self.V.new_zeros(extra, self.in_features)], 0)
        padded = LowRankLinear.from_factors(U, V, None if self.bias is None else self.bias.detach())
        padded.requires_grad_(self.U.requires_grad)
        return padded

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def warm_up(module: nn.Module, token_counts=(1,)) -> int:
    """Run every LowRankLinear in `module` once per token count, outside CUDA-graph capture.

    Capture cannot compile, autotune or load a kernel, so call this before capturing a step
    (e.g. a decode step) with each token count the graph will see: rows per call, i.e. batch x
    tokens per step. A launch inside capture that was not warmed raises NotWarmedUpError.
    Returns the number of layers run.
    """
    counts = [int(t) for t in token_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"token_counts must be positive integers; got {tuple(token_counts)}")
    layers = [m for m in module.modules() if isinstance(m, LowRankLinear)]
    with torch.no_grad():
        for layer in layers:
            for tokens in counts:
                layer(torch.zeros(tokens, layer.in_features, device=layer.U.device, dtype=layer.U.dtype))
    for device in {layer.U.device for layer in layers if layer.U.is_cuda}:
        torch.cuda.synchronize(device)  # every GPU's launches done before the caller captures
    return len(layers)


def install(layer: nn.Module, name: str, U, V, linear: nn.Linear) -> None:
    """Replace `layer`'s linear `name` by LowRankLinear factors U, V (its bias kept), in its dtype."""
    bias = linear.bias.detach() if linear.bias is not None else None
    new = LowRankLinear.from_factors(U.to(linear.weight.dtype), V.to(linear.weight.dtype), bias,
                                     dtype=linear.weight.dtype)
    set_submodule(layer, name, new)
