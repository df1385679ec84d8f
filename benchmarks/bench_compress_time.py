"""SVD-LLM compression time on SmolLM2 (dev protocol) against its floor, measured in one run.

Floor = one forward pass of the model over the calibration tokens + the SVD of every whitened
target the method decomposes (same shapes, same dtype). The pipeline adds capture, Gram
accumulation, Cholesky and triangular solves on top.

    python benchmarks/bench_compress_time.py [--ratio 0.2]
"""
import argparse
import copy
import os
import time

import torch

from _common import RESULTS, dev_protocol, provenance
from svdkern.pipeline import compress_model
from svdkern.presets import config_for


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model, _, calib, _ = dev_protocol()
    work = copy.deepcopy(model)

    with torch.no_grad():  # warm-up so neither side pays first-call costs
        model(calib[:1])
        t0 = time.perf_counter()
        for start in range(0, len(calib), args.batch_size):
            model(calib[start:start + args.batch_size], use_cache=False)
        forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            torch.linalg.svd(module.weight.double(), full_matrices=False)
    svds = time.perf_counter() - t0
    floor = forward + svds

    report = compress_model(work, calib, config_for("svd-llm", args.ratio), batch_size=args.batch_size,
                            progress=False, log=lambda *_: None)
    lines = [
        "# SVD-LLM compression time vs its floor (SmolLM2-135M, dev protocol, 64x512 tokens)",
        "",
        f"Measured {provenance()}. Command: `python benchmarks/bench_compress_time.py --ratio {args.ratio}`.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| floor: one forward pass over the calibration tokens | {forward:.1f} |",
        f"| floor: SVD of every compressed matrix (fp64) | {svds:.1f} |",
        f"| floor total | {floor:.1f} |",
        f"| svdkern SVD-LLM compression (ratio {args.ratio}) | {report.seconds:.1f} |",
        f"| **compression / floor** | **{report.seconds / floor:.2f}x** |",
        "",
        f"Achieved ratio {report.block_ratio:.4f} (decoder linears), {report.model_ratio:.4f} (whole model).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compress_time_smollm2.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
