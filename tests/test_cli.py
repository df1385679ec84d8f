"""The `svdkern` command line, end to end on a small model directory with a real tokenizer."""
import pytest

from svdkern.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import save_tiny_with_real_tokenizer

    return save_tiny_with_real_tokenizer(tmp_path_factory.mktemp("m") / "tiny")


def test_compress_then_eval_then_info(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(model_dir), "--method", "svd-llm", "--ratio", "0.3",
               "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--seqlen", "64",
               "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "dense model: perplexity" in text and "compressed model: perplexity" in text
    assert text.count("on WikiText-2 test") == 2  # every perplexity names its text
    assert "over the compressed decoder linears" in text and "peak memory" in text
    assert not (tmp_path / "out.partial").exists()
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "3", "--device", "cpu"]) == 0
    assert "over 3 windows" in capsys.readouterr().out
    assert main(["info", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    info = capsys.readouterr().out
    for line in ("method:      svd-llm at ratio 0.3", "calibration: 4 windows x 64 tokens of wikitext2",
                 "perplexity:  dense", "low-rank:    14 modules", "truncation:", "source:      " + str(model_dir)):
        assert line in info, info
    assert len(info.splitlines()) < 15 and (tmp_path / "p.png").stat().st_size > 0
    assert main(["info", str(out), "--json"]) == 0
    assert '"format_version": 2' in capsys.readouterr().out
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated: info says so, as eval would
    assert main(["info", str(out)]) == 2
    assert "model.safetensors is corrupt or truncated" in capsys.readouterr().err


def test_eval_offloads_a_model_larger_than_memory(model_dir, tmp_path, capsys):
    """--offload-dir with a host budget smaller than the model: accelerate reads layers from disk
    during the forward, and the perplexity is the in-memory one (dense and compressed)."""
    from svdkern import load_model

    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), "--method", "svd-llm", "--ratio", "0.3", "--nsamples",
                 "4", "--seqlen", "64", "--no-eval", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    for model in (out, model_dir):
        common = ["eval", str(model), "--seqlen", "64", "--windows", "3", "--device", "cpu"]
        assert main(common) == 0
        in_memory = capsys.readouterr().out.strip().splitlines()[-1]
        offload = tmp_path / f"offload-{model.name}"
        assert main([*common, "--offload-dir", str(offload), "--max-memory", "40KB"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == in_memory
        offloaded, _ = load_model(str(model), device="cpu", offload_dir=str(offload), max_memory="40KB")
        assert "disk" in offloaded.hf_device_map.values(), offloaded.hf_device_map  # layers read from disk
    assert main(["eval", str(out), "--max-memory", "1GiB", "--device", "cpu"]) == 2
    assert "pass --offload-dir too" in capsys.readouterr().err


def test_bench_and_generate_compare_with_the_source(model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), "--method", "svd", "--ratio", "0.3", "--no-eval",
                 "--out", str(out), "--device", "cpu", "--report"]) == 0
    assert (out / "report.png").stat().st_size > 0
    capsys.readouterr()
    # enough tokens and repeats that decode's timing stands above the noise of a loaded machine
    assert main(["bench", str(out), "--prompt-tokens", "16", "--new-tokens", "16", "--repeats", "3",
                 "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(model_dir), str(out)]
    assert rows[1]["parameters"] < rows[0]["parameters"] and all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert main(["bench", str(out), "--dense", "none", "--prompt-tokens", "8", "--new-tokens", "8",
                 "--repeats", "3", "--device", "cpu"]) == 0
    assert "| prefill tok/s |" in capsys.readouterr().out
    assert main(["bench", str(out), "--new-tokens", "1", "--device", "cpu"]) == 2
    assert "--new-tokens must be at least 2" in capsys.readouterr().err
    assert main(["generate", str(out), "Say hi", "--max-new-tokens", "3", "--dense", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"--- {out}:" in text and f"--- {model_dir} (dense):" in text
    from transformers import AutoTokenizer

    tokenizer_class = type(AutoTokenizer.from_pretrained(out))
    assert AutoTokenizer.from_pretrained(out).chat_template  # so the switch is what skips it
    templated = []
    real = tokenizer_class.apply_chat_template
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_class, "apply_chat_template", lambda *a, **k: templated.append(1) or real(*a, **k))
        assert main(["generate", str(out), "Say hi", "--max-new-tokens", "2", "--device", "cpu",
                     "--no-chat-template"]) == 0
        assert not templated
        assert main(["generate", str(out), "Say hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
        assert templated


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


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--ratio", "0"], "between 0 and 1"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--nsamples", "8"], "end-to-end tuning holds out 8 of 8 calibration windows"),  # the default tunes
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--rank-align", "12"], "rank_align must be one of auto, 1, 8, 16, 32, 64; got 12"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["--calib", "/no/such.txt"], "neither 'wikitext2' nor an existing text file"),
    (["--model", "/no/such/model"], "no model at /no/such/model: the path does not exist"),
    (["--model", "EMPTY"], "holds no model (no config.json)"),
    (["--model", "no-such-org/no-such-model"], "the hub is unreachable (offline)"),
])
def test_bad_arguments_fail_before_anything_loads(args, message, tmp_path, capsys, monkeypatch):
    import svdkern.api

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(svdkern.api, "load_model", no_loading)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    rc = main(["compress", "--out", "o", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert err.count("\n") == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EMPTY"]  # nothing written


@pytest.mark.parametrize("source", ["config.json", "bundled gguf"])
def test_seqlen_is_checked_against_the_config_before_the_weights_load(source, tmp_path, capsys, monkeypatch):
    import svdkern.api
    from conftest import require_bundled_model, tiny_config

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before --seqlen was checked")

    monkeypatch.setattr(svdkern.api, "load_model", no_loading)
    if source == "config.json":  # a directory with only a config: no weights are needed to refuse
        tiny_config("llama", 2).save_pretrained(tmp_path / "m")
        model, limit = str(tmp_path / "m"), tiny_config("llama", 2).max_position_embeddings
    else:
        require_bundled_model()
        model, limit = "smollm2", 8192
    rc = main(["compress", "--model", model, "--out", str(tmp_path / "o"), "--device", "cpu",
               "--seqlen", str(limit + 1)])
    err = capsys.readouterr().err
    assert rc == 2 and f"exceeds the model's context length {limit}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_what_needs_the_model_is_checked_before_the_dense_evaluation(model_dir, tmp_path, capsys, monkeypatch):
    import svdkern.evaluate
    import svdkern.preflight

    def no_evaluation(*_a, **_k):
        raise AssertionError("the dense evaluation ran before the run was checked")

    monkeypatch.setattr(svdkern.evaluate, "perplexity", no_evaluation)
    base = ["compress", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*base, "--seqlen", "100000"]) == 2
    assert "exceeds the model's context length 2048" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("a few words " * 20)  # over 64 bytes, under 64 tokens
    assert main([*base, "--seqlen", "64", "--calib", str(tmp_path / "short.txt")]) == 2
    assert "too few for seqlen 64" in capsys.readouterr().err
    (tmp_path / "short.txt").unlink()
    monkeypatch.setattr(svdkern.preflight, "available_host_bytes", lambda: 2 ** 20)
    assert main([*base, "--seqlen", "64"]) == 2
    assert "GiB of host memory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_end_to_end_tuning(model_dir, tmp_path, capsys, monkeypatch):
    """The default preset tunes every factor with AdamW: a machine that fits the layer-wise solve
    but not the tuning's gradients and moments is refused before the run, with the way out named."""
    import torch
    from transformers import AutoModelForCausalLM

    import svdkern.preflight as preflight
    from conftest import tiny_model
    from svdkern.models import architecture_of
    from svdkern.pipeline import block_linear_params

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = block_linear_params(model.get_submodule("model.layers"), architecture_of(model))
    solve = preflight.estimate_memory(model, "both", 16, 64, None, "cpu")
    tuned = preflight.estimate_memory(model, "both", 16, 64, None, "cpu", tune_params=params, tune_topk=128)
    assert tuned.host == {**solve.host, "end-to-end tuning": 12 * params, "tuning targets": 16 * 64 * (128 * 12 + 4)}
    half = preflight.estimate_memory(tiny_model("llama", dtype=torch.bfloat16), "both", 16, 64, None, "cpu",
                                     tune_params=params, tune_topk=128)
    assert half.host["end-to-end tuning"] == 18 * params  # + fp32 masters and their gradients

    base = ["compress", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--nsamples", "16", "--seqlen", "64", "--no-eval"]
    monkeypatch.setattr("svdkern.cli.check_model_fits", lambda *_a: None)  # the model itself fits
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: sum(solve.host.values()) + 4096)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "end-to-end tuning" in err and "--tune-epochs 0" in err
    assert not (tmp_path / "o").exists()


def test_an_empty_calibration_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import svdkern.api

    monkeypatch.setattr(svdkern.api, "load_model", lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "empty.txt").write_text("")
    rc = main(["compress", "--out", str(tmp_path / "o"), "--device", "cpu", "--calib", str(tmp_path / "empty.txt")])
    assert rc == 2 and "holds 0 bytes, too short for one window of 512 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_overwrite_replaces_only_svdkern_outputs(model_dir, tmp_path, capsys):
    import svdkern

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = ["compress", "--model", str(model_dir), "--method", "svd", "--no-eval", "--device", "cpu", "--overwrite"]
    assert main([*args, "--out", str(mine)]) == 2
    assert "is not an svdkern output (no svdkern.json)" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    model, _ = svdkern.load_model(str(model_dir))
    with pytest.raises(FileExistsError, match="not an svdkern output"):
        svdkern.save(model, str(mine), overwrite=True)
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--out", str(tmp_path / "out")]) == 0  # an svdkern output is replaced
    (tmp_path / "empty").mkdir()
    assert main([*args, "--out", str(tmp_path / "empty")]) == 0


def test_ctrl_c_ends_cleanly_and_the_rerun_resumes_without_redoing_the_dense_evaluation(
        model_dir, tmp_path, capsys, monkeypatch):
    import svdkern.evaluate
    import svdkern.checkpoint

    args = ["compress", "--model", str(model_dir), "--method", "ep-svd-llm", "--ratio", "0.3",
            "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--out", str(tmp_path / "o"),
            "--device", "cpu", "--batch-size", "2"]
    real_atomic, calls = svdkern.checkpoint._atomic, [0]

    def interrupted(write, path):
        calls[0] += 1
        if calls[0] == 3:  # during layer 0's checkpoint
            raise KeyboardInterrupt
        real_atomic(write, path)

    monkeypatch.setattr(svdkern.checkpoint, "_atomic", interrupted)
    assert main(args) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().endswith("interrupted") and "Traceback" not in captured.err
    assert "dense_eval.json" in {p.name for p in (tmp_path / "o.partial").iterdir()}
    monkeypatch.setattr(svdkern.checkpoint, "_atomic", real_atomic)
    real_ppl, evaluated = svdkern.evaluate.perplexity, []
    monkeypatch.setattr(svdkern.evaluate, "perplexity",
                        lambda *a, **k: evaluated.append(1) or real_ppl(*a, **k))
    assert main(args) == 0
    assert len(evaluated) == 1  # the compressed model only: the dense result was kept
    assert "dense model: perplexity" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_compress_streams_from_disk(model_dir, tmp_path, capsys, monkeypatch):
    """--stream-from-disk on a directory of small shards: the output loads and holds the in-memory
    run's factors; a model that does not fit in memory is refused with the flag named."""
    import torch

    import svdkern
    import svdkern.preflight as preflight
    from conftest import tiny_with_real_tokenizer

    model, tokenizer = tiny_with_real_tokenizer()
    source = tmp_path / "sharded"
    model.save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    common = ["--method", "ep-svd-llm", "--ratio", "0.3", "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
    assert main(["compress", "--model", str(source), *common, "--out", str(tmp_path / "mem"), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["compress", "--model", str(source), *common, "--out", str(tmp_path / "disk"),
                 "--stream-from-disk"]) == 0
    text = capsys.readouterr().out
    assert "saved to" in text and "reading shards" in text and not (tmp_path / "disk.partial").exists()
    mem, disk = svdkern.load(tmp_path / "mem", dtype=torch.float32), svdkern.load(tmp_path / "disk", dtype=torch.float32)
    assert len(disk.config.quantization_config.ranks) == 14
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(mem(ids).logits, disk(ids).logits)
    assert main(["compress", "--model", "smollm2", "--method", "ep-svd-llm", "--stream-from-disk",
                 "--out", str(tmp_path / "x")]) == 2
    assert "reads a model directory of safetensors shards" in capsys.readouterr().err
    assert main(["compress", "--model", str(source), *common, "--stream-from-disk", "--tune-epochs", "1",
                 "--tune-holdout", "2", "--out", str(tmp_path / "t")]) == 2
    assert "end-to-end tuning trains the whole model at once" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 1000)
    assert main(["compress", "--model", str(source), *common, "--out", str(tmp_path / "y"), "--no-eval"]) == 2
    assert "pass --stream-from-disk" in capsys.readouterr().err
