"""End-to-end tuning: after the layer-wise solve, train the factors toward the dense model's outputs.

Each matrix's solve (and block refinement) minimizes a local error; what matters is the model's
next-token distribution. This stage trains only the low-rank factors (optionally the norm weights
and biases too) to minimize KL(dense ‖ compressed) on the calibration windows:

- Targets: the dense model's top-k log-probabilities per token plus the mass of the rest of the
  vocabulary, computed once before any layer is compressed (`dense_targets`); the KL is exact on
  these k + 1 buckets (k = the vocabulary gives the full KL).
- Held-out calibration windows (the last `tune_holdout` of them, never stepped on) measure the
  KL after every epoch; the state with the lowest one is kept (early stopping), so tuning never
  ends worse on them than it started. The test split is never seen.
- Memory: activation checkpointing per decoder layer, the head in token chunks (head.py), fp32
  master copies only of what trains (when the model is in half precision).
- AdamW with linear warm-up and cosine decay, gradients clipped to norm 1 (on SmolLM2 at 0.2,
  with EP, lr 1e-4 lowered the held-out KL at each of 2 epochs; 3e-4 raised it).
- Under torch.distributed each rank holds the windows of its calibration micro-batches; each
  step's gradients (sums over its windows) are all-reduced, so every rank takes the same step
  (one process's, up to the order of the sums).
- Resume: after every epoch the state (parameters, optimizer, schedule, best state) goes to the
  checkpoint directory; an interrupted run restarts from the last finished epoch and ends where an
  uninterrupted one does (the window order of epoch e is a fixed permutation seeded by e).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import distributed
from .blocks import propagate
from .head import chunk_tokens, chunked_sum, final_hidden, head_logits, head_only
from .models import architecture_of
from .nn import LowRankLinear


@dataclass
class DenseTargets:
    """The dense model's next-token distributions on this rank's windows, coarsened to k + 1 buckets."""
    index: list            # global window numbers, in the order of the tensors below
    ids: torch.Tensor      # (w, T, k) int64 top-k token ids
    logp: torch.Tensor     # (w, T, k) their log-probabilities
    rest: torch.Tensor     # (w, T) log of the remaining probability mass

    def of(self, window: int):
        j = self.index.index(window)
        return self.ids[j], self.logp[j], self.rest[j]

    def to_dict(self) -> dict:
        return {"index": torch.tensor(self.index), "ids": self.ids, "logp": self.logp, "rest": self.rest}

    @classmethod
    def from_dict(cls, d: dict) -> "DenseTargets":
        return cls(d["index"].tolist(), d["ids"], d["logp"], d["rest"])


def _rest_logmass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ over the tokens not in `ids` of exp(logp) (−inf where `ids` covers the vocabulary)."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def top_buckets(logits: torch.Tensor, k: int):
    """(top-k ids, their log-probabilities, log of the rest's mass) of each row of `logits`."""
    logp = torch.log_softmax(logits.float(), -1)
    lp, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, lp, _rest_logmass(logp, ids)


@torch.no_grad()
def dense_targets(model: nn.Module, store, inputs, windows: torch.Tensor, k: int, batch_size: int, device,
                  offload, progress: bool = True) -> DenseTargets:
    """Top-k buckets of the still-dense model on this rank's windows.

    Layer by layer through `store` from the captured first-layer inputs (as every pass of the
    pipeline runs, so a model larger than the device works), then the final norm and the head
    in token chunks; `windows` are all ranks' (this rank's are the micro-batches of `inputs`).
    """
    hidden = inputs.hidden
    for i in tqdm(range(len(store)), desc="dense targets", unit="layer", disable=not progress):
        layer = store.fetch(i)
        hidden = propagate(layer, hidden, inputs.kwargs[i], device, offload)
        store.put_back(i, layer)
    mine = distributed.local_indices(len(windows), batch_size)
    step = chunk_tokens(model.get_output_embeddings().weight.shape[0])
    ids, logp, rest = [], [], []
    with head_only(store.layers) as head:
        start = 0
        for h in hidden:
            batch = windows[mine[start:start + len(h)]]
            start += len(h)
            head.value = h.to(device)
            last = final_hidden(model, batch.to(device))
            for row in last:
                parts = [top_buckets(head_logits(model, c), k) for c in row.split(step)]
                for out, part in zip((ids, logp, rest), zip(*parts)):
                    out.append(torch.cat(part).cpu())
    if not ids:
        empty = torch.zeros(0, windows.shape[1], min(k, model.get_output_embeddings().weight.shape[0]))
        return DenseTargets(mine, empty.long(), empty, empty[..., 0])
    return DenseTargets(mine, torch.stack(ids), torch.stack(logp), torch.stack(rest))


def bucket_kl(logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(target ‖ model) on the k + 1 buckets (the top-k tokens, the rest)."""
    logq = torch.log_softmax(logits.float(), -1)
    q_top = logq.gather(-1, ids)
    q_rest = _rest_logmass(logq, ids)
    kl = (logp.exp() * (logp - q_top)).sum(-1)
    has_rest = torch.isfinite(rest)
    rest_term = torch.where(has_rest, rest.exp() * (rest - q_rest.clamp_min(-1e4)), torch.zeros_like(rest))
    return (kl + rest_term).sum()


def window_kl(model: nn.Module, window: torch.Tensor, target, device) -> torch.Tensor:
    """Mean per-token KL(dense ‖ model) of one window (a graph when gradients are on)."""
    ids, logp, rest = (t.to(device) for t in target)
    hidden = final_hidden(model, window[None].to(device))
    return chunked_sum(model, hidden, bucket_kl, ids[None], logp[None], rest[None]) / window.shape[0]


def trainable_parameters(model: nn.Module, norms: bool) -> list[tuple[str, nn.Parameter]]:
    """The factors of every LowRankLinear; with `norms`, also the norm weights and the biases of
    the compressed linears and the decoder layers' norms."""
    arch = architecture_of(model)
    chosen = []
    for name, module in model.get_submodule(arch.layers_path).named_modules():
        if isinstance(module, LowRankLinear):
            chosen += [(f"{name}.U", module.U), (f"{name}.V", module.V)]
            if norms and module.bias is not None:
                chosen.append((f"{name}.bias", module.bias))
        elif norms and "norm" in type(module).__name__.lower():
            chosen += [(f"{name}.{n}", p) for n, p in module.named_parameters(recurse=False)]
    return chosen


@contextmanager
def checkpointed_layers(model: nn.Module):
    """Each decoder layer recomputes its forward in the backward pass (activation checkpointing):
    memory holds the layers' inputs, not their insides. The model stays in eval mode."""
    layers = model.get_submodule(architecture_of(model).layers_path)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance's own forward (accelerate's hooks)
    for layer in layers:
        forward = layer.forward
        layer.forward = (lambda *a, forward=forward, **kw:
                         checkpoint(forward, *a, use_reentrant=False, **kw) if torch.is_grad_enabled() else forward(*a, **kw))
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward shows again
            else:
                layer.forward = forward


@dataclass
class TuneResult:
    before: float                 # held-out KL (nats per token) before tuning
    after: float                  # held-out KL of the kept state
    kept_epoch: int               # 0: the untuned factors were kept
    history: list = field(default_factory=list)  # held-out KL after each epoch
    steps: int = 0
    trained: int = 0              # parameters trained


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def split_windows(count: int, holdout: int) -> tuple[list[int], list[int]]:
    if not 1 <= holdout < count:
        raise ValueError(f"end-to-end tuning holds out {holdout} of {count} calibration windows: it needs "
                         "at least one to select on and one to train on (raise --nsamples, lower "
                         "--tune-holdout, or turn tuning off with --tune-epochs 0)")
    return list(range(count - holdout)), list(range(count - holdout, count))


def tune_end_to_end(model: nn.Module, windows: torch.Tensor, targets: DenseTargets, cfg, batch_size: int,
                    device, saved_state: dict | None = None, save_state=None, progress: bool = True,
                    log=print) -> TuneResult:
    """Train the factors of compressed `model` in place (see the module doc).

    windows: all ranks' calibration windows; targets: this rank's (its micro-batches of
    `batch_size`). saved_state: what `save_state` was given after an epoch, to resume from.
    """
    fit, held = split_windows(len(windows), cfg.tune_holdout)
    named = trainable_parameters(model, cfg.tune_norms)
    if not named:
        raise ValueError("end-to-end tuning found no low-rank factors to train (every matrix stayed dense)")
    params = [p for _, p in named]
    mine = set(distributed.local_indices(len(windows), batch_size))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in params]
    for m in masters:
        m.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(masters, lr=cfg.tune_lr, weight_decay=0.0)
    per_epoch = math.ceil(len(fit) / cfg.tune_batch)
    total, warmup = per_epoch * cfg.tune_epochs, max(1, per_epoch // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, warmup))

    def held_out_kl() -> float:
        with torch.no_grad():
            s = sum(float(window_kl(model, windows[w], targets.of(w), device)) for w in held if w in mine)
        return distributed.summed_float(s, device) / len(held)

    def copy_to_model(source):
        with torch.no_grad():
            for p, m in zip(params, source):
                if m is not p:
                    p.copy_(m)  # also from the host copies of the kept state

    try:
        with checkpointed_layers(model):
            if saved_state is None:
                state = {"epoch": 0, "history": [], "before": held_out_kl(), "steps": 0}
                state.update(best=state["before"], best_epoch=0, best_params=_on_host(masters))
            else:
                state = dict(saved_state)
                with torch.no_grad():
                    for m, saved in zip(masters, state.pop("params")):
                        m.copy_(saved)
                copy_to_model(masters)
                opt.load_state_dict(state.pop("optimizer"))  # moves the moments to the parameters' device
                sched.load_state_dict(state.pop("schedule"))
            bar = tqdm(total=total, initial=state["steps"], desc="tune end-to-end", unit="step",
                       disable=not progress)
            for epoch in range(state["epoch"], cfg.tune_epochs):
                order = [fit[j] for j in torch.randperm(len(fit), generator=torch.Generator().manual_seed(epoch))]
                for s in range(0, len(order), cfg.tune_batch):
                    _step(model, windows, targets, order[s:s + cfg.tune_batch], mine, params, masters, opt, device)
                    sched.step()
                    copy_to_model(masters)
                    state["steps"] += 1
                    bar.update()
                kl = held_out_kl()
                state["history"].append(kl)
                if kl < state["best"]:
                    state.update(best=kl, best_epoch=epoch + 1, best_params=_on_host(masters))
                state["epoch"] = epoch + 1
                bar.set_postfix(held_out_kl=f"{kl:.4f}")
                if save_state is not None:
                    save_state({**state, "params": _on_host(masters), "optimizer": opt.state_dict(),
                                "schedule": sched.state_dict()})
            bar.close()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, m in zip(params, masters):
            p.grad = m.grad = None
    copy_to_model(state["best_params"])
    if distributed.rank() == 0:
        log(f"end-to-end tuning: held-out KL {state['before']:.4f} -> {state['best']:.4f} nats/token "
            f"(kept epoch {state['best_epoch']} of {cfg.tune_epochs})")
    return TuneResult(state["before"], state["best"], state["best_epoch"], state["history"], state["steps"],
                      sum(p.numel() for p in params))


def _on_host(tensors) -> list:
    """Copies on the CPU: the kept state and the checkpointed one take no device memory."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


def _step(model, windows, targets, batch: list[int], mine: set, params, masters, opt, device) -> None:
    for p in params:
        p.grad = None
    for w in batch:
        if w in mine:
            (window_kl(model, windows[w], targets.of(w), device) / len(batch)).backward()
    for p, m in zip(params, masters):
        grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
        m.grad = distributed.summed(grad)  # every rank's windows of this step
        if m is not p:
            p.grad = None
    torch.nn.utils.clip_grad_norm_(masters, 1.0)
    opt.step()
