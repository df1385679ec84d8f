"""Data-parallel calibration under torch.distributed (issue 12).

Under an initialized process group (torchrun, or the API inside one), each rank runs the layers
on its share of the calibration micro-batches (global batches r, r + W, r + 2W, …); the Gram and
cross-term sums and their token counts are all-reduced before every solve (`stats.py`), so every
rank sees the same problem, one process's up to the order of the sums; each matrix is solved by
one rank and its factors broadcast to the others (`share_solves`). NCCL on GPUs, gloo on CPUs. What needs per-batch bookkeeping across ranks (β chosen on held-out batches, block
refinement, the searched or measured rank policies, checkpoints) is refused for now, by name.
"""
from __future__ import annotations

import torch

UNSUPPORTED = "under torch.distributed svdkern supports the uniform rank policy without β selection, " \
              "refinement or checkpoints so far"


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def check_supported(cfg, checkpoint_dir) -> None:
    problems = [what for what, bad in (
        (f"layer_policy {cfg.layer_policy!r}", cfg.layer_policy != "uniform"),
        ("beta_grid (held-out β selection)", bool(cfg.beta_grid)),
        ("refine_epochs (block refinement)", bool(cfg.refine_epochs)),
        ("checkpoint_dir (resume)", checkpoint_dir is not None)) if bad]
    if problems:
        raise ValueError(f"{UNSUPPORTED}: this run asks for {', '.join(problems)}. Run it in one "
                         "process, or drop those settings.")


def local_windows(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's micro-batches, in order (the short last batch, if any, stays last)."""
    starts = list(range(0, len(windows), batch_size))
    mine = [windows[s:s + batch_size] for i, s in enumerate(starts) if i % world() == rank()]
    if not mine:
        raise ValueError(f"{len(starts)} calibration micro-batches cannot feed {world()} ranks: raise "
                         "nsamples or lower the batch size")
    return torch.cat(mine)


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the same on every rank)."""
    if world() == 1:
        return tensor
    total = tensor.clone()
    torch.distributed.all_reduce(total)
    return total


def summed_count(count: int, device) -> int:
    if world() == 1:
        return count
    return int(summed(torch.tensor([count], dtype=torch.float64, device=device)).item())


def share_solves(layer, prefix: str, owners: list, report) -> None:
    """Give every rank the factors (and report entries) of the matrices in `owners`, a list of
    (module name in `layer`, rank that solved it), broadcast from their solvers in that order."""
    if world() == 1 or not owners:
        return
    from .blocks import install
    from .nn import LowRankLinear

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


def all_agree(flag: bool, device) -> bool:
    """True only where every rank says True (decisions that must not differ between ranks)."""
    if world() == 1:
        return flag
    return bool(summed(torch.tensor([float(flag)], device=device)).item() == world())
