"""Stock transformers loading: svdkern registers itself as a quantization method.

A compressed directory's config.json carries `quantization_config = {"quant_method": "svdkern",
"ranks": {...}}`. After `import svdkern`, `AutoModelForCausalLM.from_pretrained(dir)` finds the
quantizer below, which swaps each listed nn.Linear for a LowRankLinear of the saved rank while the
model is still on the meta device, so the factors load like any weights (device_map, dtype and
`save_pretrained` included).

Without svdkern, transformers only warns about an unknown quantization method and would build a
dense model with random linear layers. So the weights file also holds a one-element marker under
the first compressed module's dense `weight` name: a stock load then stops on a size mismatch,
never silently, after a warning whose first line names the fix (the method's name, QUANT_METHOD)
and a report that lists a key naming it again (HINT_KEY).
"""
from __future__ import annotations

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .models import set_submodule
from .nn import LowRankLinear

# The name is the first line a stock load prints ("Unknown quantization type, got …"), so it says
# what to do. Directories saved before it carry the plain name, still read (LEGACY_METHOD).
QUANT_METHOD = "svdkern: pip install svdkern and import svdkern before from_pretrained"
LEGACY_METHOD = "svdkern"
FORMAT_VERSION = 2
HINT_KEY = "svdkern_factors.pip_install_svdkern_and_import_svdkern_before_from_pretrained"


class CheckpointError(ValueError):
    """A missing, corrupt, mismatched or too new svdkern checkpoint."""


@register_quantization_config(LEGACY_METHOD)
@register_quantization_config(QUANT_METHOD)
class SvdkernConfig(QuantizationConfigMixin):
    """The per-module ranks of a compressed model (and the marker's name)."""

    def __init__(self, ranks: dict, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"this directory was saved by a newer svdkern (format {self.format_version}; this one "
                f"reads up to {FORMAT_VERSION}): upgrade svdkern (pip install -U svdkern)")
        if not ranks:
            raise CheckpointError("the svdkern quantization_config lists no compressed modules")
        self.ranks = {str(name): int(rank) for name, rank in ranks.items()}

    def marker_key(self) -> str:
        return f"{sorted(self.ranks)[0]}.weight"


def marked_state_dict(model, config: SvdkernConfig, dtype=None) -> dict:
    """The model's tensors (cast to `dtype` if given; tied tensors stay one) plus the marker."""
    cast: dict = {}
    state = {}
    for key, value in model.state_dict().items():
        if value.is_meta or value.data_ptr() == 0:  # no storage to share (meta, offloaded)
            ident = key
        else:
            ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if ident not in cast:
            cast[ident] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        state[key] = cast[ident]
    state[config.marker_key()] = torch.zeros(1, dtype=dtype or torch.float32)
    state[HINT_KEY] = torch.zeros(1, dtype=dtype or torch.float32)  # listed by a stock load's report
    return state


@register_quantizer(LEGACY_METHOD)
@register_quantizer(QUANT_METHOD)
class SvdkernQuantizer(HfQuantizer):
    """Builds LowRankLinear modules of the saved ranks before the factors load."""

    requires_calibration = True  # only loads compressed directories: `svdkern compress` makes them

    def _process_model_before_weight_loading(self, model, **kwargs):
        ranks = self.quantization_config.ranks
        for name, rank in ranks.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(f"the checkpoint names module {name}, which this "
                                  f"{model.config.model_type} model lacks") from exc
            low = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                                device="meta", dtype=linear.weight.dtype)
            set_submodule(model, name, low)
        patterns = [self.quantization_config.marker_key().replace(".", r"\."), HINT_KEY.replace(".", r"\.")]
        ignore = model._keys_to_ignore_on_load_unexpected
        model._keys_to_ignore_on_load_unexpected = (set(ignore or ()) | set(patterns) if isinstance(ignore, set)
                                                    else list(ignore or []) + patterns)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():  # the loader makes trainable Parameters; factors start frozen
            if isinstance(module, LowRankLinear):
                module.requires_grad_(False)
        _plain_floats(model)
        return model

    save_dtype = None  # set by svdkern.save for the duration of one save_pretrained

    def get_state_dict_and_metadata(self, model, *args, **kwargs):  # 4.x also passes safe_serialization
        return marked_state_dict(model, self.quantization_config, self.save_dtype), {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_qat_trainable(self) -> bool:  # the factors are ordinary float Parameters
        return True

    @property
    def is_compileable(self) -> bool:  # lowrank_linear is a torch.library op with a fake
        return True


def mark_compressed(model) -> SvdkernConfig:
    """Attach the config and quantizer that `save_pretrained` needs to write a loadable directory
    (called by `compress`, `save` and after padding ranks: the ranks are read afresh)."""
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not ranks:
        raise CheckpointError("the model has no LowRankLinear layers: compress it first (or save a dense "
                              "model with save_pretrained)")
    config = SvdkernConfig(ranks)
    model.config.quantization_config = config
    model.hf_quantizer = SvdkernQuantizer(config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    _plain_floats(model)
    return config


def _plain_floats(model) -> None:
    """transformers refuses .half()/.float() and Trainer for `is_quantized` models; the factors
    are ordinary float tensors, so svdkern models stay unflagged (the quantizer is only for I/O)."""
    for module in model.modules():
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
