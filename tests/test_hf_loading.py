"""Stock transformers loading of compressed directories (issue 14): every path gives one model."""
import os
import subprocess
import sys

import pytest
import torch

import svdkern
from svdkern.nn import LowRankLinear

from conftest import tiny_model
from test_models import FAMILIES


def logits(model, windows):
    with torch.no_grad():
        return model(windows[:2]).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_load_path_gives_the_same_logits(family, tmp_path, windows):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, seed=4)
    svdkern.compress(model, "svd-llm", 0.3, calib=windows, progress=False, log=lambda *_: None)
    expected = logits(model, windows)
    svdkern.save(model, tmp_path / "a")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "a", device_map="cpu", dtype=torch.float32)
    ours = svdkern.load(tmp_path / "a")
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for loaded in (stock, ours):
        assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == ranks
        assert not any(p.requires_grad for m in loaded.modules() if isinstance(m, LowRankLinear)
                       for p in m.parameters())
        torch.testing.assert_close(logits(loaded, windows), expected, rtol=0, atol=0)
    stock.save_pretrained(tmp_path / "b")  # a loaded model saves a directory that loads the same way
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(logits(again, windows), expected, rtol=0, atol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "a", device_map="cpu", dtype=torch.bfloat16)
    assert {p.dtype for m in half.modules() if isinstance(m, LowRankLinear) for p in m.parameters()} == {torch.bfloat16}


def test_stock_loading_without_svdkern_fails_and_names_the_fix(tmp_path, windows):
    model = tiny_model("llama")
    svdkern.compress(model, "svd", 0.3, progress=False, log=lambda *_: None)
    svdkern.save(model, tmp_path / "m")
    code = ("import sys; sys.modules['svdkern'] = None\n"  # as if svdkern were not installed
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="200"))
    assert done.returncode != 0 and "RuntimeError" in done.stderr
    assert "import_svdkern_before_from_pretrained" in done.stderr
    first = done.stderr.strip().splitlines()[0]  # the first line a user reads says what to do
    assert "got svdkern: pip install svdkern and import svdkern before from_pretrained" in first, first


def test_directories_saved_under_the_plain_method_name_still_load(tmp_path, windows):
    """Before the method's name carried the hint it was plain "svdkern": such directories load."""
    import json

    model = tiny_model("llama")
    svdkern.compress(model, "svd", 0.3, progress=False, log=lambda *_: None)
    svdkern.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "svdkern"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM

    for loaded in (svdkern.load(tmp_path / "m", dtype=torch.float32),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)):
        assert torch.equal(loaded(windows).logits, model(windows).logits)


def test_dense_models_cannot_be_compressed_through_the_quantizer(windows):
    from transformers import AutoModelForCausalLM

    from svdkern.hf_quantizer import SvdkernConfig

    with pytest.raises(ValueError, match="pre-quantized|pre_quantized|calibration"):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            tiny_model("llama").save_pretrained(d)
            AutoModelForCausalLM.from_pretrained(d, quantization_config=SvdkernConfig({"model.layers.0.mlp.up_proj": 4}))


def test_tied_embeddings_stay_one_tensor_through_a_cast_save(tmp_path, windows):
    from safetensors import safe_open

    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    svdkern.compress(model, "svd", 0.3, progress=False, log=lambda *_: None)
    svdkern.save(model, tmp_path / "m", dtype=torch.bfloat16)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("model.embed_tokens.weight" in keys) != ("lm_head.weight" in keys)  # one copy on disk
    loaded = svdkern.load(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


def test_loaded_and_compressed_models_stay_ordinary_float_models(tmp_path, windows):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    svdkern.compress(model, "svd", 0.3, progress=False, log=lambda *_: None)
    model.save_pretrained(tmp_path / "direct")  # right after compress: loadable, stock
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "direct")
    torch.testing.assert_close(logits(loaded, windows), logits(model, windows), rtol=0, atol=0)
    for m in (model, loaded):
        assert not getattr(m, "is_quantized", False)
        assert m.hf_quantizer.is_compileable and m.hf_quantizer.is_qat_trainable
        m.half()  # transformers refuses .half()/.float() on quantized models
        m.float()


def test_padded_ranks_save_and_load_back(tmp_path, windows):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    svdkern.compress(model, "svd-llm", 0.3, calib=windows, rank_align=1, progress=False, log=lambda *_: None)
    svdkern.save(model, tmp_path / "a")
    padded = svdkern.load(tmp_path / "a", pad_ranks_to=16)
    low = [m for m in padded.modules() if isinstance(m, LowRankLinear)]
    assert all(m.rank % 16 == 0 or m.rank + 16 > min(m.in_features, m.out_features) for m in low)
    assert sum(m.rank % 16 == 0 for m in low) > len(low) // 2
    padded.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert ({n: m.rank for n, m in again.named_modules() if isinstance(m, LowRankLinear)}
            == {n: m.rank for n, m in padded.named_modules() if isinstance(m, LowRankLinear)})
    torch.testing.assert_close(logits(again, windows), logits(model, windows), rtol=1e-5, atol=1e-5)


def test_the_bundled_gguf_saves_as_a_plain_model(tmp_path):
    """transformers keeps a GGUF file's quantizer after dequantizing it, which refuses
    save_pretrained; load_model drops it, so the bundled model converts to safetensors (the
    input `--stream-from-disk` reads) with the same logits."""
    from transformers import AutoModelForCausalLM

    from conftest import require_bundled_model

    require_bundled_model()
    model, _ = svdkern.load_model("smollm2")
    model.save_pretrained(tmp_path / "plain", max_shard_size="100MB")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert getattr(again.config, "quantization_config", None) is None
