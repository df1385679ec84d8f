"""What a person reads about a compressed directory: `svdkern info` and the report plot."""
from __future__ import annotations

import json
import os
from collections import defaultdict

from .io import METADATA


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not an svdkern directory: {METADATA} is missing")
    with open(path) as f:
        return json.load(f)


def summary(directory: str, meta: dict) -> str:
    """A few readable lines: method, source, ratio, calibration, perplexity, ranks."""
    run, comp = meta.get("run") or {}, meta.get("compression") or {}
    source = meta.get("source") or {}
    ranks = meta.get("ranks", {})
    lines = [f"svdkern model in {directory} (format {meta.get('format_version')}, "
             f"{meta.get('model_type')}, stored in {meta.get('dtype')})"]
    if source.get("model"):
        lines.append(f"  source:      {source['model']}")
    if run.get("method"):
        lines.append(f"  method:      {run['method']} at ratio {run['ratio']}")
    if comp:
        lines.append(f"  achieved:    {comp['block_ratio']:.4f} of the compressed decoder linears removed, "
                     f"{comp['model_ratio']:.4f} of the whole model"
                     + (f"; compressed in {comp['seconds']:.1f} s" if comp.get("seconds") is not None else ""))
    calib = run.get("calibration")
    if calib:
        lines.append(f"  calibration: {calib['nsamples']} windows x {calib['seqlen']} tokens of "
                     f"{calib['text']} (seed {calib['seed']}, {calib['sampler']})")
    evaluation = meta.get("evaluation")
    if evaluation:
        lines.append(f"  perplexity:  dense {evaluation['dense']:.3f} -> compressed {evaluation['compressed']:.3f} "
                     f"on {evaluation['text']}")
    if ranks:
        values = sorted(ranks.values())
        lines.append(f"  low-rank:    {len(ranks)} modules, ranks {values[0]}..{values[-1]} "
                     f"(median {values[len(values) // 2]})")
    errors = comp.get("truncation") or {}
    if errors:
        worst = max(errors, key=errors.get)
        lines.append(f"  truncation:  mean {sum(errors.values()) / len(errors):.4f} of the (whitened) target's "
                     f"energy dropped; most in layer {worst} ({errors[worst]:.4f})")
    return "\n".join(lines)


def per_layer(comp: dict) -> dict:
    """{layer index: (mean truncation error, total rank)} from a report's per-matrix entries."""
    errors, ranks = defaultdict(list), defaultdict(int)
    for name, err in (comp.get("truncation") or {}).items():
        errors[int(name.split(".")[0])].append(err)
    for name, rank in (comp.get("layer_ranks") or {}).items():
        ranks[int(name.split(".")[0])] += rank
    return {i: (sum(errors[i]) / len(errors[i]), ranks.get(i, 0)) for i in sorted(errors)}


def plot(meta: dict, path: str) -> str:
    """Per-layer truncation error and total rank, as a PNG (matplotlib)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("the report plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = per_layer(meta.get("compression") or {})
    if not layers:
        raise ValueError("this directory's report has no per-layer entries to plot")
    xs = list(layers)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(xs, [layers[i][0] for i in xs], "o-", color="tab:red")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("truncation error (mean)", color="tab:red")
    twin = ax.twinx()
    twin.bar(xs, [layers[i][1] for i in xs], alpha=0.3, color="tab:blue")
    twin.set_ylabel("sum of ranks", color="tab:blue")
    run = meta.get("run") or {}
    ax.set_title(f"{run.get('method', 'svdkern')} at ratio {run.get('ratio', '?')}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
