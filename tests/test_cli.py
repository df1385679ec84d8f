"""The `svdkern` command line, end to end on a small model directory with a real tokenizer."""
import pytest
import torch

from svdkern.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import require_bundled_model

    folder, name = os.path.split(require_bundled_model())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "tiny"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_compress_then_eval_then_info(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(model_dir), "--method", "svd-llm", "--ratio", "0.3",
               "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--seqlen", "64",
               "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "dense model: perplexity" in text and "compressed model: perplexity" in text
    assert "over the compressed decoder linears" in text and "peak memory" in text
    assert not (tmp_path / "out.partial").exists()
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "3", "--device", "cpu"]) == 0
    assert "over 3 windows" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert '"format_version": 1' in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--nsamples", "0"], "nsamples must be at least 1"),
    (["--calib", "/no/such.txt"], "neither 'wikitext2' nor an existing text file"),
    (["--method", "erc-svd", "--ratio", "0.97"], "no PLC layer count is feasible"),
    (["--method", "svd-llm", "--alpha-grid", "0,0.5"], "beta_grid chooses beta per matrix"),
    (["--alpha-grid", "0,1.5"], "beta_grid values must lie in [0, 1]"),
    (["--policy", "sensitivity", "--min-rank-fraction", "2"], "min_rank_fraction must lie in [0, 1]"),
    (["--method", "sc-svd-llm", "--refine-epochs", "1"], "refinement targets the FP block output"),
])
def test_bad_input_exits_with_a_message(model_dir, tmp_path, capsys, args, message):
    rc = main(["compress", "--model", str(model_dir), "--no-eval", "--out", str(tmp_path / "o"),
               "--device", "cpu", "--seqlen", "64", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_of_a_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "svdkern.json").write_text("{}")
    rc = main(["eval", str(tmp_path / "bad"), "--device", "cpu"])
    assert rc == 2 and "error:" in capsys.readouterr().err
