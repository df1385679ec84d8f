"""Zero-shot evaluation through lm-eval on a local task (offline): scores equal a direct computation."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

ITEMS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "made of stone"], "answer": 0},
    {"question": "Water freezes at", "choices": ["one hundred degrees", "zero degrees Celsius"], "answer": 1},
    {"question": "A cat is a kind of", "choices": ["animal", "mineral", "vegetable", "planet"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["five", "four"], "answer": 1},
    {"question": "The opposite of hot is", "choices": ["cold", "loud", "tall"], "answer": 0},
]


def local_task(folder) -> str:
    data = folder / "items.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in ITEMS) + "\n")
    yaml = folder / "tiny_mc.yaml"
    yaml.write_text(f"""task: svdkern_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return str(yaml)


def direct_loglikelihoods(model, tokenizer, question, choices):
    """log p(" " + choice | question), summed over the choice's tokens, computed by hand."""
    context = tokenizer(question, add_special_tokens=False).input_ids
    scores = []
    for choice in choices:
        whole = tokenizer(question + " " + choice, add_special_tokens=False).input_ids
        continuation = whole[len(context):]
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
    return scores


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    from conftest import tiny_with_real_tokenizer

    return tiny_with_real_tokenizer(seed=3)


def test_local_task_scores_match_a_direct_computation(tiny_with_tokenizer, tmp_path, monkeypatch):
    from svdkern.zeroshot import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny_with_tokenizer
    results = evaluate(model, tokenizer, local_task(tmp_path), batch_size=2, log_samples=True)
    samples = sorted(results["samples"]["svdkern_tiny_mc"], key=lambda s: s["doc_id"])
    correct, correct_norm = [], []
    for item, sample in zip(ITEMS, samples):
        ours = direct_loglikelihoods(model, tokenizer, item["question"], item["choices"])
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == item["answer"])
        per_byte = [s / len((" " + c).encode()) for s, c in zip(ours, item["choices"])]
        correct_norm.append(max(range(len(ours)), key=per_byte.__getitem__) == item["answer"])
    metrics = results["results"]["svdkern_tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(sum(correct) / len(ITEMS))
    assert metrics["acc_norm,none"] == pytest.approx(sum(correct_norm) / len(ITEMS))


def test_cli_tasks_print_a_table_and_check_names_first(tiny_with_tokenizer, tmp_path, capsys, monkeypatch):
    from svdkern.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny_with_tokenizer
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--tasks", local_task(tmp_path), "--device", "cpu",
                 "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| task | acc | acc_norm | n |" in out and "| svdkern_tiny_mc |" in out
    assert main(["eval", str(tmp_path / "m"), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "no task file" in capsys.readouterr().err
