"""Where a compression spends its time: seconds per stage, summed over layers.

Stages are timed where they happen (statistics inside the forward hooks included) through the
clock the pipeline activates; "forward" is what remains of the layer loop. On CUDA each stage
ends with a synchronize, so the seconds are the GPU's, not the launches'.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

_active: "StageClock | None" = None


class StageClock:
    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.seconds: dict[str, float] = {}
        self._depth = 0

    @contextmanager
    def stage(self, name: str):
        if self._depth:  # a stage inside another is counted once, by the outer one
            yield
            return
        self._sync()
        started = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1  # first: an interrupt inside the sync below must not leave it set
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def _sync(self):
        if self.device is not None:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def activate(self):
        """Make this the clock that `timed` reports to while the block runs."""
        global _active
        saved, _active = _active, self
        try:
            yield self
        finally:
            _active = saved


def timed(stage: str):
    """Time a block under `stage` on the active clock (a no-op when none is active)."""
    return _active.stage(stage) if _active is not None else nullcontext()
