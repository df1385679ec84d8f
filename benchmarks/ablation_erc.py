"""Why ERC-SVD loses to SVD-LLM at high ratios on SmolLM2: an ablation of REC and PLC.

    python benchmarks/ablation_erc.py [--ratio 0.6] [--plc-samples 32]

Runs REC alone (every layer, uniform ratio, residual β = 0.05) and PLC alone (no residual
stage) under the dev protocol, prints their perplexity, and writes the rank split that REC's
fixed residual rank r_r = floor(β·mn/(m+n)) leaves at the layer ratio PLC picks.
"""
import argparse
import copy
import json
import os

from _common import RESULTS, dev_protocol, provenance
from svdkern.evaluate import perplexity
from svdkern.pipeline import compress_model
from svdkern.presets import config_for
from svdkern.solvers.rank import rank_for_ratio, residual_rank


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--plc-samples", type=int, default=32)
    args = ap.parse_args()
    model, _, calib, evals = dev_protocol()
    variants = {
        "REC only (all layers, residual 0.05)": config_for("svd-llm", args.ratio, residual_beta=0.05),
        "PLC only (no residual stage)": config_for("erc-svd", args.ratio, residual_beta=0.0,
                                                   plc_samples=args.plc_samples),
    }
    lines = [f"## ERC-SVD ablation at ratio {args.ratio} ({provenance()})", "",
             f"Command: `python benchmarks/ablation_erc.py --ratio {args.ratio} --plc-samples {args.plc_samples}`", "",
             "| variant | perplexity | PLC layers (layer ratio) |", "|---|---|---|"]
    for name, cfg in variants.items():
        work = copy.deepcopy(model)
        report = compress_model(work, calib, cfg, progress=False, log=lambda *_: None)
        ppl = perplexity(work, evals, progress=False).ppl
        plc = f"{report.plc['layers']} ({report.plc['layer_ratio']:.3f})" if report.plc else "all 30 (uniform)"
        lines.append(f"| {name} | {ppl:.2f} | {plc} |")
        print(lines[-1], flush=True)
        del work
    rows = [json.loads(l) for l in open(os.path.join(RESULTS, "quality_smollm2.jsonl"))]
    erc = next((r for r in rows if r["method"] == "erc-svd" and r["ratio"] == args.ratio), None)
    if erc:
        lr = erc["plc"]["layer_ratio"]
        lines += ["", f"At the layer ratio ERC chose ({lr:.3f}), REC's fixed residual rank takes this share of each rank:", "",
                  "| matrix | total rank | residual r_r | share |", "|---|---|---|---|"]
        for label, (m, n) in {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576),
                              "gate/up/down 1536x576": (1536, 576)}.items():
            k = rank_for_ratio(m, n, lr)
            rr = residual_rank(m, n, k, 0.05)
            lines.append(f"| {label} | {k} | {rr} | {rr / k:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(RESULTS, f"ablation_erc_{args.ratio}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
