"""Every method at ratios 0.2/0.4/0.6 on SmolLM2-135M under the dev protocol (issue 3/4).

Writes benchmarks/results/quality_smollm2.md (perplexity, achieved ratio, compression time),
benchmarks/results/layer_errors_0.4.png (relative output error per layer) and keeps every
finished row in quality_smollm2.jsonl, so an interrupted run resumes where it stopped.

    python benchmarks/quality_smollm2.py [--methods svd-llm,ep-svd-llm] [--ratios 0.2,0.4]
"""
import argparse
import copy
import json
import os

import torch

from _common import RESULTS, dev_protocol, provenance
from svdkern.evaluate import layer_output_errors, perplexity
from svdkern.pipeline import compress_model
from svdkern.presets import PRESETS, config_for

ROWS = os.path.join(RESULTS, "quality_smollm2.jsonl")
ORDER = ["svd", "svd-llm", "sc-svd-llm", "ep-svd-llm", "erc-svd", "saes-svd"]
PLOTTED = ("svd-llm", "ep-svd-llm", "erc-svd")
# Reference points (issue 4): the public EP-SVD-LLM reference implementation, same protocol.
REFERENCE = {"svd-llm": (86.5, 232.7, 874.0), "sc-svd-llm": (87.5, 186.5, 616.6),
             "ep-svd-llm": (65.3, 114.5, 204.1)}
RATIOS = (0.2, 0.4, 0.6)


def done_rows():
    if not os.path.exists(ROWS):
        return []
    with open(ROWS) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(methods, ratios, args):
    model, _, calib, evals = dev_protocol()
    rows = done_rows()
    have = {(r["method"], r["ratio"], json.dumps(r.get("knobs", {}), sort_keys=True)) for r in rows}
    if ("dense", 0.0, "{}") not in have:
        dense = perplexity(model, evals, progress=False)
        append({"method": "dense", "ratio": 0.0, "ppl": dense.ppl, "nonfinite": dense.nonfinite_windows})
    for ratio in ratios:
        for method in methods:
            knobs = dict(plc_samples=args.plc_samples) if method == "erc-svd" and args.plc_samples else {}
            if (method, ratio, json.dumps(knobs, sort_keys=True)) in have:
                continue
            work = copy.deepcopy(model)
            logs = []
            report = compress_model(work, calib, config_for(method, ratio, **knobs), progress=False,
                                    log=logs.append)
            result = perplexity(work, evals, progress=False)
            row = {"method": method, "ratio": ratio, "knobs": knobs, "ppl": result.ppl,
                   "nonfinite": result.nonfinite_windows, "block_ratio": report.block_ratio,
                   "model_ratio": report.model_ratio, "seconds": report.seconds, "plc": report.plc,
                   "betas": report.betas or None}
            if ratio == 0.4 and method in PLOTTED:
                row["layer_errors"] = layer_output_errors(model, work, evals[:16])
            append(row)
            print(f"{method} {ratio}: ppl {result.ppl:.2f} ({report.seconds:.0f} s)", flush=True)
            del work


def append(row):
    os.makedirs(RESULTS, exist_ok=True)
    with open(ROWS, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def render():
    rows = done_rows()
    by = {(r["method"], r["ratio"]): r for r in rows}
    dense = by.get(("dense", 0.0))
    out = ["# Quality on SmolLM2-135M (dev protocol)", "",
           f"Written by `python benchmarks/quality_smollm2.py` ({provenance()}). Model in fp32 with its",
           "GGUF tokenizer; calibration: 64 windows of 512 tokens from wiki.valid.tokens (seed 0);",
           "evaluation: the first 64 non-overlapping 512-token windows of wiki.test.raw.",
           f"Dense perplexity: **{dense['ppl']:.2f}**." if dense else "", "",
           "| method | ratio | perplexity | reference | achieved ratio (linears / model) | compression s |",
           "|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        for method in ORDER:
            r = by.get((method, ratio))
            if r is None:
                continue
            ref = REFERENCE.get(method)
            ref_text = f"{ref[RATIOS.index(ratio)]}" if ref else "–"
            bad = f" ({r['nonfinite']} non-finite windows)" if r["nonfinite"] else ""
            out.append(f"| {method} | {ratio} | {r['ppl']:.2f}{bad} | {ref_text} | "
                       f"{r['block_ratio']:.4f} / {r['model_ratio']:.4f} | {r['seconds']:.0f} |")
    plc = [(r["ratio"], r["plc"]) for r in rows if r["method"] == "erc-svd" and r.get("plc")]
    if plc:
        out += ["", "ERC-SVD's PLC search (final-layer relative error on the calibration windows):", ""]
        for ratio, p in plc:
            errs = ", ".join(f"k={k}: {float(e):.4f}" for k, e in sorted(p["errors"].items(), key=lambda kv: int(kv[0])))
            out.append(f"- ratio {ratio} (search on {p['search_windows']} windows): chose the last "
                       f"{p['layers']} layers at {p['layer_ratio']:.3f} ({errs})")
    with open(os.path.join(RESULTS, "quality_smollm2.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    plot(rows)


def plot(rows):
    curves = {r["method"]: r["layer_errors"] for r in rows if r.get("layer_errors")}
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in PLOTTED:
        if method in curves:
            ax.plot(range(len(curves[method])), curves[method], marker="o", ms=3, label=method)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error ‖h − h_dense‖ / ‖h_dense‖")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M at ratio 0.4 (16 WikiText-2 test windows)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "layer_errors_0.4.png"), dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--plc-samples", type=int, default=None)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(PRESETS)
    if unknown:
        raise SystemExit(f"unknown methods: {unknown}")
    if not args.render_only:
        run(methods, [float(r) for r in args.ratios.split(",")], args)
    render()


if __name__ == "__main__":
    main()
