"""Checkpoints: what a layer-by-layer run has finished, so an interrupted one resumes exactly.

A fingerprint of everything that decides the factors (settings, batch size, calibration, weights,
where the layers live, the number of processes) guards the directory: a run with other inputs is
refused by name instead of mixing two runs' activations.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from . import distributed
from .layer_store import LayerStore
from .models import Architecture
from .nn import LowRankLinear
from .presets import CompressionConfig
from .refine import RECIPES

REPORT_FIELDS = ("ranks", "residual_ranks", "betas", "damping", "refine", "aligned_ranks", "truncation")


class Checkpoint:
    """Per-layer factors, the stream activations and the report so far, so a run resumes.

    Every file is written under a temporary name and renamed; progress.json is renamed last and
    its layer names the stream file it goes with (`_stream_file`), so a process killed at any
    instant leaves a consistent state: the last layer whose progress.json landed. Under torch.distributed the directory is
    shared: each rank keeps its own streams (streams_NNNN.rankR.pt), rank 0 writes the rest, and
    barriers order the writes (`save`) so ranks killed at different instants still agree.
    Before the first layer come the allocation's measurements: the Fisher sensitivity, the whitened
    spectra layer by layer (`save_spectra`, the same pattern) and then the ranks.
    """

    def __init__(self, directory: str, fingerprint: dict, started: float, device=None):
        self.dir, self.fingerprint, self.device = directory, fingerprint, device  # device: for collectives
        os.makedirs(directory, exist_ok=True)
        self.progress_file = os.path.join(directory, "progress.json")
        self.started = started       # perf_counter() when this run began
        self.previous_seconds = 0.0  # compression time spent by the interrupted runs

    def seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def load(self, store: LayerStore, arch: Architecture, report):
        """(next layer, streams) from a previous run, or (0, None); restores the report entries.
        Under torch.distributed every rank resumes at the same layer or all refuse."""
        start, streams = self._on_every_rank(lambda: self._read(store, arch, report))
        self._same_on_every_rank(start)
        return start, streams

    def _read(self, store: LayerStore, arch: Architecture, report):
        if not os.path.exists(self.progress_file):
            return 0, None
        with open(self.progress_file) as f:
            progress = json.load(f)
        self._check(progress["fingerprint"])
        from safetensors.torch import load_file

        for i in range(progress["next_layer"]):
            path = os.path.join(self.dir, f"layer_{i:04d}.safetensors")
            store.restore(i, arch, lambda path=path: load_file(path))
        for key in REPORT_FIELDS:  # .get: a checkpoint from before a field existed still resumes
            getattr(report, key).update(progress["report"].get(key, {}))
        report.refine = {int(k): v for k, v in report.refine.items()}
        self.previous_seconds = progress["seconds"]
        path = os.path.join(self.dir, _stream_file(progress["next_layer"] - 1))
        if not os.path.isfile(path):
            raise RuntimeError(f"the checkpoint says layer {progress['next_layer'] - 1} is done, but this "
                               f"rank's activations {path} are missing: delete {self.dir} to start afresh")
        return progress["next_layer"], torch.load(path, weights_only=True)

    def load_allocation(self):
        """(ranks, details) the interrupted run allocated, or None (the same on every rank)."""
        saved = self._on_every_rank(self._read_allocation)
        self._same_on_every_rank(saved is not None)  # also: every rank read before rank 0 writes
        return saved

    def _on_every_rank(self, read):
        """read(); a failure on any rank fails every rank (one rank stopping alone would leave the
        others waiting in their next collective)."""
        try:
            result, error = read(), None
        except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
            result, error = None, exc
        if distributed.all_agree(error is None, self.device):
            return result
        raise error if error is not None else RuntimeError(
            f"another rank could not resume from {self.dir}; its error says why")

    def _same_on_every_rank(self, value) -> None:
        if not distributed.same_on_every_rank(value, self.device):
            raise RuntimeError(f"the ranks found different progress in {self.dir}: under torch.distributed the "
                               "checkpoint directory must be one that every rank reads (a shared file system)")

    def _read_allocation(self):
        path = os.path.join(self.dir, "allocation.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            saved = json.load(f)
        self._check(saved["fingerprint"])
        self.previous_seconds = saved["seconds"]
        details = saved["details"]
        if "errors" in details:  # PLC's candidate layer counts (JSON keeps keys as strings)
            details["errors"] = {int(k): v for k, v in details["errors"].items()}
        return saved["ranks"], details

    def save_allocation(self, ranks: dict, details: dict) -> None:
        record = {"fingerprint": self.fingerprint, "ranks": ranks, "details": details,
                  "seconds": self.seconds()}
        if distributed.rank() == 0:  # every rank allocated the same ranks
            _atomic(lambda p: _write_json(record, p), os.path.join(self.dir, "allocation.json"))
        distributed.barrier()  # the ranks are on disk: the spectra pass behind them is not needed again
        self._drop_own_files("spectra_stream_")
        if distributed.rank() == 0 and os.path.exists(os.path.join(self.dir, "spectra.pt")):
            os.remove(os.path.join(self.dir, "spectra.pt"))

    def load_fisher(self):
        """The outputs' Fisher sensitivity the interrupted run measured (the same on every rank), or None."""
        saved = self._read_record("fisher.pt")
        self._same_on_every_rank(saved is not None)
        if saved is None:
            return None
        self._check(saved["fingerprint"])
        return saved["fisher"]

    def load_spectra(self):
        """(next layer, this rank's FP stream there, the spectra of the layers before) the
        interrupted spectra pass saved, or None; every rank resumes at the same layer or all refuse."""
        saved = self._read_record("spectra.pt")
        self._same_on_every_rank(None if saved is None else saved["pass"]["next_layer"])
        if saved is None:
            return None
        self._check(saved["fingerprint"])
        done = saved["pass"]["next_layer"]
        path = os.path.join(self.dir, _rank_file(f"spectra_stream_{done:04d}"))
        hidden = self._on_every_rank(lambda: torch.load(path, map_location="cpu", weights_only=True))
        return done, hidden, saved["pass"]["spectra"]

    def save_spectra(self, next_layer: int, hidden: list, spectra: dict) -> None:
        """After each layer of the allocation's spectra pass: this rank's stream, then (rank 0) the
        spectra and the layer they reach; older streams go once that record names the new one."""
        name = _rank_file(f"spectra_stream_{next_layer:04d}")
        _atomic(lambda p: torch.save([t.cpu() for t in hidden], p), os.path.join(self.dir, name))
        distributed.barrier()  # every rank's stream is on disk before the record names it
        self._write_shared("spectra.pt", "pass", {"next_layer": next_layer, "spectra": spectra})
        self._drop_own_files("spectra_stream_", keep=name)

    def _drop_own_files(self, prefix: str, keep: str | None = None) -> None:
        """This rank's files `prefix`… (streams, one per layer) other than `keep`."""
        mine = _rank_file("")  # ".pt", or ".rankR.pt" under torch.distributed
        for name in os.listdir(self.dir):
            if name.startswith(prefix) and name.endswith(mine) and name != keep:
                os.remove(os.path.join(self.dir, name))

    def kept_before_layers(self) -> str:
        """What a rerun of an interrupted run finds before its first layer, in words."""
        kept = [what for name, what in (("allocation.json", "the ranks"), ("fisher.pt", "the Fisher measurement"),
                                        ("spectra.pt", "the spectra of the layers measured"),
                                        (_rank_file("tune_targets"), "the tuning targets"))
                if os.path.exists(os.path.join(self.dir, name))]
        if not kept:
            return f"nothing was saved yet in {self.dir}; a rerun starts afresh"
        verb = "is" if len(kept) == 1 else "are"
        return f"{' and '.join(kept)} {verb} saved in {self.dir}; rerun the same command to resume from there"

    def save_fisher(self, fisher: dict) -> None:
        self._write_shared("fisher.pt", "fisher", fisher)  # every rank holds the same all-reduced sums

    def load_targets(self):
        """The dense model's tuning targets this rank saved (tune.DenseTargets), or None."""
        from .tune import DenseTargets

        saved = self._read_record(_rank_file("tune_targets"))
        if saved is None:
            return None
        self._check(saved["fingerprint"])
        return DenseTargets.from_dict(saved["targets"])

    def save_targets(self, targets) -> None:
        record = {"fingerprint": self.fingerprint, "targets": targets.to_dict()}
        _atomic(lambda p: torch.save(record, p), os.path.join(self.dir, _rank_file("tune_targets")))

    def load_tuning(self):
        """The end-to-end tuning state after its last finished epoch (the same on every rank), or None."""
        saved = self._read_record("tune_state.pt")
        self._same_on_every_rank(None if saved is None else saved["state"]["epoch"])
        if saved is None:
            return None
        self._check(saved["fingerprint"])
        return saved["state"]

    def save_tuning(self, state: dict) -> None:
        self._write_shared("tune_state.pt", "state", state)  # every rank holds the same state

    def _read_record(self, name: str):
        """The torch record `name` in the directory (on the CPU), or None; read on every rank."""
        path = os.path.join(self.dir, name)
        return self._on_every_rank(lambda: torch.load(path, map_location="cpu", weights_only=True)
                                   if os.path.exists(path) else None)

    def _write_shared(self, name: str, key: str, value) -> None:
        """{fingerprint, key: value} to `name`, by rank 0 (every rank holds the same value)."""
        if distributed.rank() == 0:
            record = {"fingerprint": self.fingerprint, key: value}
            _atomic(lambda p: torch.save(record, p), os.path.join(self.dir, name))
        distributed.barrier()

    def _check(self, saved: dict) -> None:
        changed = _differences(saved, self.fingerprint)
        if changed:
            raise RuntimeError(
                f"checkpoint directory {self.dir} was written by a run with other settings: "
                f"{'; '.join(changed)}. Rerun with the same ones to resume, or delete the "
                "directory (or pass another checkpoint directory) to start afresh")

    def remove(self) -> None:
        """Delete what this run wrote (never anything else in the directory); rank 0 does, once
        every rank is done with it."""
        distributed.barrier()
        if distributed.rank() == 0:
            self._remove_files()
        distributed.barrier()

    def _remove_files(self) -> None:
        for name in ("progress.json", "allocation.json", "tune_state.pt", "fisher.pt",
                     "spectra.pt"):  # first: no dangling progress
            if os.path.exists(os.path.join(self.dir, name)):
                os.remove(os.path.join(self.dir, name))
        for name in os.listdir(self.dir):
            base = name.removesuffix(".tmp")  # a killed run can leave a temporary file behind
            if base.startswith(("layer_", "streams_", "tune_", "spectra_")) or base in (
                    "progress.json", "allocation.json", "fisher.pt", "spectra.pt"):
                os.remove(os.path.join(self.dir, name))
        if not os.listdir(self.dir):
            os.rmdir(self.dir)

    def save(self, index: int, layer, arch: Architecture, streams: dict, report,
             factors: bool = True, whole_layer: bool = False) -> None:
        """factors=False: the layer store has written the layer's factors itself. whole_layer:
        every parameter of the layer, not only the factors (a refinement that also trains the
        norms, biases and dense matrices changed them)."""
        from safetensors.torch import save_file

        lead = distributed.rank() == 0  # every rank holds the same factors and report
        if factors and lead:
            tensors = {}
            for name in (n for g in arch.groups for n in g):
                module = layer.get_submodule(name)
                if isinstance(module, LowRankLinear):
                    tensors[name + ".U"] = module.U.detach().contiguous().cpu()
                    tensors[name + ".V"] = module.V.detach().contiguous().cpu()
            if whole_layer:
                tensors.update({k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()
                                if k not in tensors})
            _atomic(lambda p: save_file(tensors, p), os.path.join(self.dir, f"layer_{index:04d}.safetensors"))
        stream_file = _stream_file(index)
        _atomic(lambda p: torch.save({k: [t.cpu() for t in v] for k, v in streams.items()}, p),
                os.path.join(self.dir, stream_file))
        distributed.barrier()  # every rank's streams (and rank 0's factors) are on disk
        if lead:
            progress = {"next_layer": index + 1, "fingerprint": self.fingerprint, "seconds": self.seconds(),
                        "report": {key: getattr(report, key) for key in REPORT_FIELDS}}
            _atomic(lambda p: _write_json(progress, p), self.progress_file)
        distributed.barrier()  # progress.json names this layer: this rank's older streams are superseded
        self._drop_own_files("streams_", keep=stream_file)


def _stream_file(index: int) -> str:
    """This rank's activations after layer `index`."""
    return _rank_file(f"streams_{index:04d}")


def _rank_file(stem: str) -> str:
    """`stem`.pt, or `stem`.rankR.pt under torch.distributed (a file each rank keeps for itself)."""
    rank = f".rank{distributed.rank()}" if distributed.world() > 1 else ""
    return f"{stem}{rank}.pt"


def _write_json(record, path):
    with open(path, "w") as f:
        json.dump(record, f, default=str)


def _atomic(write, path: str) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def fingerprint(model, store: LayerStore, windows: torch.Tensor, cfg: CompressionConfig,
                 batch_size: int) -> dict:
    """What a resumed run must share with the interrupted one to give the same factors."""
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    return {"config": cfg.to_dict(), "batch_size": batch_size,
            "calibration": digest(windows.cpu().numpy().tobytes()) + f" {tuple(windows.shape)}",
            "weights": store.weights_digest(model),
            "layers": "streamed from disk" if store.writes_factors else "in memory",
            "processes": distributed.world(),
            "refine_step_windows": RECIPES[cfg.refine_recipe].step_windows if cfg.refine_epochs else None,
            "model_config": digest(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())}


# what fingerprints without the key meant (refinement stepped once per micro-batch before 2026-12-08)
OLDER_CHECKPOINTS = {"layers": "in memory", "processes": 1, "refine_step_windows": None}


def _differences(saved: dict, now: dict) -> list[str]:
    """Readable names of what changed between a checkpoint's fingerprint and this run's."""
    if not isinstance(saved, dict):
        return ["a checkpoint from an older svdkern version"]
    out = []
    for key, value in now.items():
        before = saved.get(key, OLDER_CHECKPOINTS.get(key))
        if before == value:
            continue
        if key == "config":
            keys = sorted(k for k in set(value) | set(before or {}) if (before or {}).get(k) != value.get(k))
            out.append("method settings " + ", ".join(f"{k} {(before or {}).get(k)} -> {value.get(k)}" for k in keys))
        elif key == "batch_size":
            out.append(f"batch size {before} -> {value}")
        elif key == "calibration":
            out.append(f"calibration windows (data, nsamples, seqlen or seed; shape {before} -> {value})")
        elif key == "weights":
            out.append("the model's weights")
        elif key == "layers":
            out.append(f"layers {before} -> {value} (resume the way the run started)")
        elif key == "refine_step_windows":
            out.append(f"refinement windows per step {before or 'one micro-batch'} -> {value or 'one micro-batch'}"
                       " (an older svdkern's aa-svd refinement: start again)")
        elif key == "processes":
            out.append(f"processes {before} -> {value} (resume with as many ranks as the run started with)")
        else:
            out.append("the model's configuration")
    return out
