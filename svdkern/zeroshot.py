"""Zero-shot accuracy through lm-evaluation-harness on the loaded model object (`svdkern[eval]`).

lm-eval gets the model itself (its HFLM wrapper accepts a PreTrainedModel), so a compressed
model is evaluated with its LowRankLinear layers, whatever the load path. `tasks` takes lm-eval's
task names and paths to local task YAML files (their folders are added to the task search path).
"""
from __future__ import annotations

import os

LM_EVAL_VERSION = "0.4.13"


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise RuntimeError("zero-shot tasks need lm-evaluation-harness: pip install 'svdkern[eval]' "
                           f"(lm-eval=={LM_EVAL_VERSION})") from exc
    return lm_eval


def task_names(tasks: str) -> tuple[list[str], list[str]]:
    """(names, extra folders) from "arc_easy,piqa,/path/my_task.yaml"."""
    import yaml

    names, folders = [], []
    for item in (t.strip() for t in tasks.split(",") if t.strip()):
        if item.endswith((".yaml", ".yml")):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"no task file at {item}")
            with open(item) as f:
                spec = yaml.safe_load(f) or {}
            if "task" not in spec:
                raise ValueError(f"{item} has no `task:` name; lm-eval task YAMLs need one")
            names.append(spec["task"])
            folders.append(os.path.dirname(os.path.abspath(item)))
        else:
            names.append(item)
    if not names:
        raise ValueError("--tasks names no task; e.g. --tasks arc_easy,piqa or a task YAML path")
    return names, sorted(set(folders))


def evaluate(model, tokenizer, tasks: str, batch_size: int = 8, limit: int | None = None,
             log_samples: bool = False, device=None) -> dict:
    """lm-eval's results dict for `tasks` (see task_names) on this model object.

    device: where the inputs go (default: the parameters'; pass it for an offloaded model)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders = task_names(tasks)
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(unknown)}; see `lm-eval ls tasks`, or pass a YAML path")
    device = device or next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                           log_samples=log_samples, bootstrap_iters=0)


def accuracy_table(results: dict) -> str:
    """acc and acc_norm per task, as a markdown table."""
    lines = ["| task | acc | acc_norm | n |", "|---|---|---|---|"]
    for task, metrics in results["results"].items():
        acc = metrics.get("acc,none")
        norm = metrics.get("acc_norm,none")
        n = (results.get("n-samples", {}).get(task) or {}).get("effective", "")
        fmt = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
        lines.append(f"| {task} | {fmt(acc)} | {fmt(norm)} | {n} |")
    return "\n".join(lines)
