"""Named methods are settings of one engine (DESIGN.md): stream, β, residual rank, layer policy."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .solvers.rank import check_ratio


@dataclass(frozen=True)
class CompressionConfig:
    """Every knob of the engine.

    stream: whose activations calibrate each layer — "fp" (the original model's, SVD-LLM,
        ERC), "compressed" (the already-compressed model's, SC), "both" (EP, SAES).
    whitening: "cholesky" | "eigh", or None for plain truncated SVD of W.
    beta: weight of the error-propagation term W Δ P⁻ᵀ (EP's α, CEALC's β); needs stream "both".
    aces: choose β per matrix in `aces_range` (SAES-SVD); needs stream "both".
    residual_beta: ERC's REC residual rank factor (r_r = floor(residual_beta·mn/(m+n))).
    layer_policy: "uniform" (every layer at `ratio`) or "plc" (ERC: only the last k layers at
        N·ratio/k, k searched in steps of `plc_step` on `plc_samples` calibration windows).
    fp_cache_bytes: two streams keep the FP stream's group inputs of one layer (fp32, on the
        offload device) when they fit in this many bytes, else recompute them per group.
    """

    ratio: float
    stream: str = "fp"
    whitening: str | None = "cholesky"
    beta: float = 0.0
    aces: bool = False
    aces_range: tuple[float, float] = (0.25, 0.75)
    residual_beta: float = 0.0
    layer_policy: str = "uniform"
    plc_step: int = 2
    plc_samples: int | None = None
    damp_rel: float = 1e-6
    max_damp_rel: float = 1e-2
    svd_dtype: torch.dtype = torch.float64
    fp_cache_bytes: int = 4 << 30

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.stream not in ("fp", "compressed", "both"):
            raise ValueError(f"stream must be fp, compressed or both; got {self.stream!r}")
        if (self.beta != 0.0 or self.aces) and self.stream != "both":
            raise ValueError("beta/aces need the FP stream beside the compressed one (stream='both')")
        if self.aces and self.beta != 0.0:
            raise ValueError("aces chooses beta per matrix; do not also fix beta (--alpha)")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (EP alpha) must lie in [0, 1]; got {self.beta}")
        if not 0.0 <= self.residual_beta < 1.0:
            raise ValueError(f"residual_beta must lie in [0, 1); got {self.residual_beta}")
        if self.layer_policy not in ("uniform", "plc"):
            raise ValueError(f"layer_policy must be uniform or plc; got {self.layer_policy!r}")
        if self.layer_policy == "plc" and self.stream != "fp":
            raise ValueError("layer_policy 'plc' is defined on FP statistics (stream='fp')")
        if self.whitening is None and self.stream != "fp":
            raise ValueError("plain SVD (whitening=None) uses no calibration stream")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["svd_dtype"] = str(self.svd_dtype).replace("torch.", "")
        d["aces_range"] = list(self.aces_range)
        return d


PRESETS: dict[str, dict] = {
    "svd": dict(whitening=None),
    "svd-llm": dict(),
    "sc-svd-llm": dict(stream="compressed"),
    "ep-svd-llm": dict(stream="both", beta=0.5),
    "erc-svd": dict(residual_beta=0.05, layer_policy="plc"),
    "saes-svd": dict(stream="both", aces=True),
}


def config_for(method: str, ratio: float, **overrides) -> CompressionConfig:
    """The engine settings of a named method, with any knob overridden."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PRESETS)}")
    settings = {**PRESETS[method], **{k: v for k, v in overrides.items() if v is not None}}
    return CompressionConfig(ratio=ratio, **settings)
