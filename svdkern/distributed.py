"""Data-parallel calibration under torch.distributed (issue 12).

Under an initialized process group (torchrun, or the API inside one), each rank runs the layers
on its share of the calibration micro-batches (global batches r, r + W, r + 2W, …); the Gram and
cross-term sums and their token counts are all-reduced before every solve (`stats.py`), so every
rank sees the same problem, one process's up to the order of the sums; each matrix is solved by
one rank and its factors broadcast to the others (`share_solves`). NCCL on GPUs, gloo on CPUs.
Batch-indexed choices use global batch indices (β's held-out batches are the last ones of all
ranks; PLC searches on the first ones) and their sums (PLC's errors, the Fisher sensitivities)
are all-reduced too; block refinement steps through the global batches in order, each gradient
broadcast by the rank that holds its batch. Checkpoints work as in one process, in a directory
every rank can read (checkpoint.py: each rank keeps its own streams).
"""
from __future__ import annotations

import torch

from .nn import LowRankLinear, install


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def local_indices(count: int, batch_size: int) -> list[int]:
    """The numbers of the windows in this rank's micro-batches (global batches r, r + W, …)."""
    return [i for i in range(count) if (i // batch_size) % world() == rank()]


def local_windows(windows: torch.Tensor, batch_size: int, allow_none: bool = False) -> torch.Tensor:
    """This rank's micro-batches, in order (the short last batch, if any, stays last)."""
    mine = local_indices(len(windows), batch_size)
    if not mine:
        if allow_none:
            return windows[:0]
        raise ValueError(f"{-(-len(windows) // batch_size)} calibration micro-batches cannot feed {world()} ranks: "
                         "raise nsamples or lower the batch size")
    return windows[mine]


def global_batch(local: int) -> int:
    """The global index of this rank's micro-batch number `local` (see local_windows)."""
    return rank() + world() * local


def local_count(global_batches: int, local_batches: int) -> int:
    """How many of this rank's micro-batches are among the first `global_batches` of all."""
    return sum(global_batch(j) < global_batches for j in range(local_batches))


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the same on every rank)."""
    if world() == 1:
        return tensor
    total = tensor.clone()
    torch.distributed.all_reduce(total)
    return total


def summed_float(value: float, device) -> float:
    return value if world() == 1 else float(summed(torch.tensor([value], dtype=torch.float64, device=device)))


def summed_count(count: int, device) -> int:
    if world() == 1:
        return count
    return int(summed(torch.tensor([count], dtype=torch.float64, device=device)).item())


def share_solves(layer, prefix: str, owners: list, report) -> None:
    """Give every rank the factors (and report entries) of the matrices in `owners`, a list of
    (module name in `layer`, rank that solved it), broadcast from their solvers in that order."""
    if world() == 1 or not owners:
        return
    fields = ("ranks", "residual_ranks", "betas", "truncation", "aligned_ranks", "damping")
    for name, owner in owners:
        module = layer.get_submodule(name)
        entries = [None]
        if owner == rank():
            entries = [{f: {k: v for k, v in getattr(report, f).items() if k == prefix + name or
                            (f == "damping" and k.startswith(prefix))} for f in fields}]
        torch.distributed.broadcast_object_list(entries, src=owner)
        for f, values in entries[0].items():
            getattr(report, f).update(values)
        r = entries[0]["ranks"][prefix + name]
        weight = module.U if isinstance(module, LowRankLinear) else module.weight
        U = module.U.detach() if owner == rank() else weight.new_empty(module.out_features, r)
        V = module.V.detach() if owner == rank() else weight.new_empty(r, module.in_features)
        torch.distributed.broadcast(U, src=owner)
        torch.distributed.broadcast(V, src=owner)
        if owner != rank():
            install(layer, name, U, V, module)


def broadcast_grads(params, src: int) -> None:
    """Give every rank the gradients rank `src` computed (zeros where it made none)."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.broadcast(p.grad, src=src)


def all_agree(flag: bool, device) -> bool:
    """True only where every rank says True (decisions that must not differ between ranks)."""
    if world() == 1:
        return flag
    return bool(summed(torch.tensor([float(flag)], device=device)).item() == world())


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()


def same_on_every_rank(value, device) -> bool:
    """Whether every rank holds rank 0's `value` (a picklable one); the same answer on every rank."""
    if world() == 1:
        return True
    lead = [value]
    torch.distributed.broadcast_object_list(lead, src=0)
    return all_agree(lead[0] == value, device)
