"""svdkern: compress LLMs by replacing their linear layers with low-rank factors, and run them fast."""
from ._ops import cholesky_whiten, cross_accumulate, gram_accumulate, lowrank_linear
from .api import compress, compress_from_disk, load_model
from .backends.cuda_ext import has_cuda_ext
from .backends.lowrank_configs import NotWarmedUpError
from .evaluate import perplexity
from .io import load, save
from .nn import LowRankLinear, warm_up
from .presets import PRESETS, CompressionConfig, config_for

__all__ = [
    "CompressionConfig", "LowRankLinear", "NotWarmedUpError", "PRESETS", "cholesky_whiten", "compress",
    "compress_from_disk", "config_for", "cross_accumulate", "gram_accumulate", "has_cuda_ext", "load", "load_model",
    "lowrank_linear", "perplexity", "save", "warm_up",
]
__version__ = "0.1.0"
