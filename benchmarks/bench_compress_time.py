"""Compression time of each method on SmolLM2 (dev protocol) against its floor, in one run.

Floor = one forward pass of the decoder layers over the calibration tokens per stream the method
calibrates on (SVD-LLM and SC 1, EP and SAES 2; no lm_head, which no method needs) + the SVD of
every whitened target it decomposes once (same shapes, fp64). SAES decomposes each target twice
(ACES's subspaces, then G(β*)), which its row shows above the floor. The pipeline adds capture,
statistics, Cholesky and triangular solves on top.

The statistics are timed too, on their own: the exact sums every method needs (each input
group's Gram lower triangle over the calibration tokens, and for the two streams also the full
cross term Δ = Σ δᵀx̂), accumulated from random activations of the same shapes, micro-batch by
micro-batch, through the same ops. "floor + statistics" is then the work no implementation of
these methods can skip; what is above it is the engine's own overhead.

    python benchmarks/bench_compress_time.py [--ratio 0.2] [--methods svd-llm,sc-svd-llm,ep-svd-llm,saes-svd]
"""
import argparse
import copy
import os
import time

import torch

from _common import RESULTS, dev_protocol, provenance
from svdkern.pipeline import compress_model
from svdkern.presets import config_for


STREAMS = {"fp": 1, "compressed": 1, "both": 2}


def statistics_seconds(model, tokens_per_batch: int, batches: int, cross: bool) -> float:
    """Seconds to accumulate one layer's Grams (and Δ, with `cross`) over the calibration
    tokens, times the number of layers (every layer has the same widths)."""
    from svdkern._ops import cross_accumulate, gram_accumulate
    from svdkern.models import architecture_of

    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers_path)
    widths = [layers[0].get_submodule(group[0]).in_features for group in arch.groups]
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(2, tokens_per_batch, n, generator=g) for n in set(widths)}  # FP and compressed
    gram_accumulate(torch.zeros(8, 8), torch.randn(4, 8))  # first-call costs off the clock
    t0 = time.perf_counter()
    for n in widths:
        H, D = torch.zeros(n, n), torch.zeros(n, n)
        for _ in range(batches):
            x_fp, x_hat = xs[n]
            gram_accumulate(H, x_hat)
            if cross:
                cross_accumulate(D, x_fp - x_hat, x_hat)
    return (time.perf_counter() - t0) * len(layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default="svd-llm,sc-svd-llm,ep-svd-llm,saes-svd")
    args = ap.parse_args()
    model, _, calib, _ = dev_protocol()

    with torch.no_grad():  # warm-up so neither side pays first-call costs
        model.model(calib[:1])
        t0 = time.perf_counter()
        for start in range(0, len(calib), args.batch_size):
            model.model(calib[start:start + args.batch_size], use_cache=False)
        forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            torch.linalg.svd(module.weight.double(), full_matrices=False)
    svds = time.perf_counter() - t0
    batches = -(-len(calib) // args.batch_size)
    stats = {streams: statistics_seconds(model, args.batch_size * calib.shape[1], batches, streams == 2)
             for streams in (1, 2)}

    rows = []
    for method in args.methods.split(","):
        cfg = config_for(method, args.ratio)
        work = copy.deepcopy(model)
        report = compress_model(work, calib, cfg, batch_size=args.batch_size, progress=False,
                                log=lambda *_: None)
        streams = STREAMS[cfg.stream]
        floor = streams * forward + svds
        rows.append(f"| {method} | {streams} | {floor:.1f} | {report.seconds:.1f} | "
                    f"**{report.seconds / floor:.2f}x** | {stats[streams]:.1f} | "
                    f"{(floor + stats[streams]) / floor:.2f}x | **{report.seconds / (floor + stats[streams]):.2f}x** | "
                    f"{report.block_ratio:.4f} |")
        print(rows[-1], flush=True)
        del work
    lines = [
        "# Compression time vs its floor (SmolLM2-135M, dev protocol, 64x512 tokens)",
        "",
        f"Measured {provenance()}. Command: `python benchmarks/bench_compress_time.py --ratio {args.ratio} "
        f"--methods {args.methods}`.",
        "",
        f"One forward pass of the decoder layers over the calibration tokens: {forward:.1f} s. "
        f"SVD of every compressed matrix (fp64): {svds:.1f} s. Statistics alone (Grams; Grams and Δ): "
        f"{stats[1]:.1f} s; {stats[2]:.1f} s.",
        "",
        f"| method (ratio {args.ratio}) | streams | floor s | compression s | compression / floor | "
        "statistics s | (floor + statistics) / floor | compression / (floor + statistics) | achieved ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "compress_time_smollm2.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
