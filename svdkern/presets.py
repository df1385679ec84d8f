"""Named methods are settings of one engine (DESIGN.md): stream, β, residual rank, layer policy."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .solvers.rank import RANK_ALIGNS, check_ratio

LAYER_POLICIES = ("uniform", "plc", "v2", "sensitivity")


@dataclass(frozen=True)
class CompressionConfig:
    """Every knob of the engine.

    stream: whose activations calibrate each layer — "fp" (the original model's, SVD-LLM,
        ERC), "compressed" (the already-compressed model's, SC), "both" (EP, SAES).
    whitening: "cholesky" | "eigh", or None for plain truncated SVD of W.
    beta: weight of the error-propagation term W Δ P⁻ᵀ (EP's α, CEALC's β); needs stream "both".
    aces: choose β per matrix in `aces_range` (SAES-SVD); needs stream "both".
    residual_beta: ERC's REC residual rank factor (r_r = floor(residual_beta·mn/(m+n))).
    layer_policy: which rank each matrix gets (policy.py): "uniform" (every matrix at `ratio`),
        "plc" (ERC: only the last k layers at N·ratio/k, k searched in steps of `plc_step` on
        `plc_samples` calibration windows), "v2" (SVD-LLM V2's rule) or "sensitivity"
        (Fisher-weighted water-filling on `sensitivity_samples` windows, no matrix below
        `min_rank_fraction` of its uniform rank). Every policy keeps at most the uniform
        parameter count.
    output_weighting: output-aware whitening: weigh each output channel in the solve by its
        Fisher sensitivity to this power (0 off, 1 the diagonal-Fisher loss; sensitivity.py),
        measured on `sensitivity_samples` windows.
    beta_grid: choose β per matrix from these values by the held-out output error
        (solvers/select.py); needs stream "both", excludes a fixed beta and aces.
    refine_epochs / refine_lr: block-level refinement (refine.py) after each block: passes of
        Adam steps over the calibration micro-batches; needs the FP stream ("fp" or "both").
    refine_recipe: "svdkern" (Adam on the factors, best held-out state) or "aa-svd" (AA-SVD's
        reference recipe: AdamW on every block parameter, MSE, warm-up and cosine, last state).
    gram_stream: with two streams, whose activations whiten the solve: "compressed" (the
        compressed model's, EP/SAES) or "fp" (the original model's, as AA-SVD's default objective:
        SVD-LLM's solve, with the compressed stream kept for refinement); "fp" takes no β.
    holdout_batches: the last calibration micro-batches, never fitted by β selection or
        refinement steps, that choose β and the kept refinement state.
    rank_align: move each rank to a multiple of this (8 … 64: aligned, vectorized GPU kernel
        loads), or "auto": 64…8 where rounding down drops at most 2% of the rank (solvers.rank.
        align_step); what rounding frees is given back within the budget (allocation.
        align_within_budget); 1 keeps the ranks of the papers' rules.
    tune_epochs / tune_lr / tune_batch: end-to-end tuning (tune.py) after the layer-wise solve:
        epochs of AdamW steps (tune_batch windows each) on the factors toward the dense model's
        next-token distributions (KL on its top `tune_topk` tokens and the rest); 0 turns it off.
    tune_holdout: the last calibration windows, never stepped on, that pick the kept epoch.
    tune_norms: also train the norm weights and the compressed linears' biases.
    delta_damp_rel: two streams filter Δ by the compressed stream's Gram, Δ H (H + μI)⁻¹ with μ this
        times mean(diag H) (solvers.factorize.visible_delta), so fp32 rounding along the Gram's
        near-null directions does not reach the factors; 0 keeps the raw Δ (the reference code's).
    fp_cache_bytes: two streams keep the FP stream's group inputs of one layer (fp32, on the
        offload device) when they fit in this many bytes, else recompute them per group.
    """

    ratio: float
    stream: str = "fp"
    whitening: str | None = "cholesky"
    beta: float = 0.0
    aces: bool = False
    aces_range: tuple[float, float] = (0.25, 0.75)
    beta_grid: tuple[float, ...] = ()
    residual_beta: float = 0.0
    layer_policy: str = "uniform"
    plc_step: int = 2
    plc_samples: int | None = None
    sensitivity_samples: int | None = None
    min_rank_fraction: float = 0.0
    output_weighting: float = 0.0
    damp_rel: float = 1e-6
    max_damp_rel: float = 1e-2
    delta_damp_rel: float = 1e-3
    svd_dtype: torch.dtype = torch.float64
    fp_cache_bytes: int = 4 << 30
    refine_epochs: int = 0
    refine_lr: float = 1e-3
    refine_recipe: str = "svdkern"
    gram_stream: str = "compressed"
    holdout_batches: int = 1
    rank_align: int | str = "auto"
    tune_epochs: int = 0
    tune_lr: float = 1e-4
    tune_batch: int = 4
    tune_holdout: int = 8
    tune_topk: int = 128
    tune_norms: bool = False

    def __post_init__(self):
        object.__setattr__(self, "beta_grid", tuple(float(b) for b in self.beta_grid))
        check_ratio(self.ratio)
        if self.stream not in ("fp", "compressed", "both"):
            raise ValueError(f"stream must be fp, compressed or both; got {self.stream!r}")
        if (self.beta != 0.0 or self.aces) and self.stream != "both":
            raise ValueError("beta/aces need the FP stream beside the compressed one (stream='both')")
        if self.aces and self.beta != 0.0:
            raise ValueError("aces chooses beta per matrix; do not also fix beta (--alpha)")
        if self.beta_grid and (self.stream != "both" or self.aces or self.beta != 0.0):
            raise ValueError("beta_grid chooses beta per matrix on held-out batches: it needs "
                             "stream='both' and neither a fixed beta (--alpha) nor aces")
        if any(not 0.0 <= b <= 1.0 for b in self.beta_grid):
            raise ValueError(f"beta_grid values must lie in [0, 1]; got {self.beta_grid}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (EP alpha) must lie in [0, 1]; got {self.beta}")
        if not 0.0 <= self.residual_beta < 1.0:
            raise ValueError(f"residual_beta must lie in [0, 1); got {self.residual_beta}")
        if self.layer_policy not in LAYER_POLICIES:
            raise ValueError(f"layer_policy must be one of {', '.join(LAYER_POLICIES)}; got {self.layer_policy!r}")
        if self.layer_policy != "uniform" and self.whitening is None:
            raise ValueError(f"layer_policy {self.layer_policy!r} measures whitened spectra: it needs whitening")
        if not 0.0 <= self.output_weighting <= 1.0:
            raise ValueError(f"output_weighting (a power of the Fisher weights) must lie in [0, 1]; "
                             f"got {self.output_weighting}")
        if self.output_weighting and (self.whitening is None or self.beta_grid):
            raise ValueError("output_weighting weighs the outputs of the whitened solve: it needs whitening "
                             "and no beta_grid (whose selection measures unweighted errors); pass "
                             "output_weighting=0 (--output-weighting 0) to choose β per matrix")
        if not 0.0 <= self.delta_damp_rel < 1.0:
            raise ValueError(f"delta_damp_rel must lie in [0, 1); got {self.delta_damp_rel}")
        if not 0.0 <= self.min_rank_fraction <= 1.0:
            raise ValueError(f"min_rank_fraction must lie in [0, 1]; got {self.min_rank_fraction}")
        if self.sensitivity_samples is not None and self.sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be at least 1; got {self.sensitivity_samples}")
        if self.refine_epochs < 0 or self.refine_lr <= 0 or self.holdout_batches < 0:
            raise ValueError("refinement needs refine_epochs >= 0, refine_lr > 0, holdout_batches >= 0")
        if self.refine_epochs and (self.stream == "compressed" or self.whitening is None):
            raise ValueError("refinement targets the FP block output: it needs stream 'fp' or 'both' "
                             "and whitening")
        if self.tune_epochs < 0 or self.tune_lr <= 0 or self.tune_batch < 1 or self.tune_holdout < 1 \
                or self.tune_topk < 1:
            raise ValueError("end-to-end tuning needs tune_epochs >= 0, tune_lr > 0, and tune_batch, "
                             "tune_holdout and tune_topk >= 1")
        if self.tune_epochs and self.whitening is None:
            raise ValueError("end-to-end tuning trains on the calibration windows: plain SVD (whitening=None) "
                             "has none; use a calibrated method")
        if self.refine_recipe not in ("svdkern", "aa-svd"):
            raise ValueError(f"refine_recipe must be svdkern or aa-svd; got {self.refine_recipe!r}")
        if self.gram_stream not in ("compressed", "fp"):
            raise ValueError(f"gram_stream must be compressed or fp; got {self.gram_stream!r}")
        if self.gram_stream == "fp" and (self.stream != "both" or self.beta or self.aces or self.beta_grid):
            raise ValueError("gram_stream='fp' whitens with the original model's activations beside a compressed "
                             "stream: it needs stream='both' and no beta, aces or beta_grid")
        if self.rank_align not in RANK_ALIGNS:
            raise ValueError(f"rank_align must be one of {', '.join(map(str, RANK_ALIGNS))}; got {self.rank_align!r}")
        if self.whitening is None and self.stream != "fp":
            raise ValueError("plain SVD (whitening=None) uses no calibration stream")

    @property
    def needs_fisher(self) -> bool:
        """Whether the run measures the outputs' Fisher sensitivity (sensitivity.output_fisher)."""
        return self.layer_policy == "sensitivity" or self.output_weighting > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["svd_dtype"] = str(self.svd_dtype).replace("torch.", "")
        d["aces_range"] = list(self.aces_range)
        d["beta_grid"] = list(self.beta_grid)
        return d


PRESETS: dict[str, dict] = {
    "svd": dict(whitening=None),
    "svd-llm": dict(),
    "sc-svd-llm": dict(stream="compressed"),
    "ep-svd-llm": dict(stream="both", beta=0.5),
    "erc-svd": dict(residual_beta=0.05, layer_policy="plc"),
    "saes-svd": dict(stream="both", aces=True),
    # svdkern's own composition (issues 9, 21): EP's two streams, ranks water-filled by measured loss
    # sensitivity, each output weighted in the solve by that Fisher sensitivity to the power 0.5,
    # then 3 epochs of end-to-end tuning toward the dense model's next-token distributions. Chosen
    # on held-out calibration windows of SmolLM2 (and the weighting on Gemma3's too): tuning beat
    # block refinement (held-out perplexity 32.06 against 33.38, in 0.6x its time), and tuning
    # after refinement found no better epoch, so refinement is no longer part of it.
    "best": dict(stream="both", beta=0.5, layer_policy="sensitivity", sensitivity_samples=16,
                 output_weighting=0.5, tune_epochs=3),
    # AA-SVD's reference code at its defaults (objective "obj2": SVD-LLM's whitened solve on the
    # original model's activations; then 25 epochs of block refinement on the compressed stream's
    # inputs toward the FP block outputs, AdamW lr 1e-4, every block parameter, one step per 32
    # windows, last state kept).
    "aa-svd": dict(stream="both", gram_stream="fp", refine_epochs=25, refine_lr=1e-4, refine_recipe="aa-svd",
                   holdout_batches=0),
}
DEFAULT_METHOD = "best"


def config_for(method: str, ratio: float, **overrides) -> CompressionConfig:
    """The engine settings of a named method, with any knob overridden."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("beta_grid") and "beta" not in overrides:
        overrides["beta"] = 0.0  # a chosen β replaces the preset's fixed one
    settings = {**PRESETS[method], **overrides}
    return CompressionConfig(ratio=ratio, **settings)
