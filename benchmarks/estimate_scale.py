"""Peak memory and time to compress LLaMA-7B and LLaMA-70B, on one and on eight devices (issue 12),
estimated from per-layer measurements on LLaMA-7B's shapes (random weights, a few layers).

    python benchmarks/estimate_scale.py                # the CPU: widths / 4, about two minutes
    python benchmarks/estimate_scale.py --scale 1      # a GPU: LLaMA-7B's own layers
    python benchmarks/estimate_scale.py --dry-run      # seconds (the GPU suite's check)

Measured: a random-weight model of L and of 2L layers is saved as bf16 safetensors shards and
compressed with SVD-LLM through `compress_from_disk` (the path a model larger than memory
takes), each depth in a fresh process. The difference of the two runs' per-stage seconds
(svdkern/clock.py) is the cost of one layer; the run's peak host memory (and device memory on
a GPU) is compared with an analytic working set of one layer.

Extrapolated, stage by stage, in proportion to each stage's work per layer:
  forward and capture  tokens x layer parameters
  statistics           tokens x sum over input groups of n^2 (one Gram per group)
  solves               sum over matrices of m n min(m, n) (SVD) + sum over groups of n^3 (whitening)
  shard reading/writing  layer parameters
Memory: the measured peak divided by the analytic working set at the measured shape, times the
working set at the target shape (one layer in the run's dtype and its factors, the fp64 Gram,
whitening factor and inverse of the widest group, the widest whitened target and its SVD in the
solve dtype, three activation buffers, the embeddings and head).
Eight devices (svdkern.distributed, data parallel): forward, capture and statistics divided by 8;
solves on the critical path of the round-robin split of each layer's seven matrices
(compress_group's assignment); every rank reads every layer, rank 0 writes; plus the all-reduce
of each layer's fp32 Grams, whose time assumes --link-gbs (a stated assumption, not measured).
On a CPU the device is the CPU: the table says what this machine would take, and only the GPU
run (--scale 1 on an H100/H200, in benchmarks/gpu_suite.py) measures LLaMA-7B's layers directly.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _common import RESULTS, provenance
from _harness import write_text

SHAPES = {  # hidden, intermediate, key/value width, layers, vocabulary (LLaMA-2)
    "LLaMA-7B": (4096, 11008, 4096, 32, 32000),
    "LLaMA-70B": (8192, 28672, 1024, 80, 32000),
}


def matrices(hidden, inter, kv):
    """(out, in) of one layer's seven linears, and the input width of each of its four groups."""
    mats = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return mats, [hidden, hidden, hidden, inter]


def work(hidden, inter, kv) -> dict:
    mats, groups = matrices(hidden, inter, kv)
    params = sum(m * n for m, n in mats.values())
    return {"forward": params, "statistics": sum(n * n for n in groups),
            "solves": sum(m * n * min(m, n) for m, n in mats.values()) + sum(n ** 3 for n in groups),
            "io": params}


def solve_critical_path(hidden, inter, kv, ranks: int) -> float:
    """Solve work of the busiest rank per layer under the round-robin split (one process: all)."""
    mats, groups = matrices(hidden, inter, kv)
    group_of = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
    load = [0.0] * ranks
    whitened = [set() for _ in range(ranks)]
    for j, (name, (m, n)) in enumerate(mats.items()):
        r = j % ranks
        load[r] += m * n * min(m, n)
        whitened[r].add(group_of[name])
    for r in range(ranks):
        load[r] += sum(groups[g] ** 3 for g in whitened[r])
    return max(load)


def working_set(hidden, inter, kv, vocab, tokens, itemsize, solve_itemsize) -> int:
    mats, groups = matrices(hidden, inter, kv)
    layer = sum(m * n for m, n in mats.values()) * itemsize
    widest = max(groups)
    target = max(m * n for m, n in mats.values())
    return int(2 * layer + 3 * 8 * widest ** 2 + 3 * solve_itemsize * target
               + 3 * 4 * tokens * hidden + 2 * itemsize * vocab * hidden)


STAGES = {"capture": "forward", "forward and the rest": "forward", "allocation": "forward",
          "statistics": "statistics", "solves": "solves", "reading shards": "io", "writing shards": "io",
          "checkpoint I/O": "io"}


def child(scale: int, layers: int, nsamples: int, seqlen: int, device: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import svdkern
    from svdkern.host import proc_bytes

    hidden, inter, kv, _, vocab = SHAPES["LLaMA-7B"]
    cfg = AutoConfig.for_model("llama", hidden_size=hidden // scale, intermediate_size=inter // scale,
                               num_attention_heads=32 // scale, num_key_value_heads=32 // scale,
                               num_hidden_layers=layers, vocab_size=vocab // scale, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(
            os.path.join(tmp, "src"), max_shard_size="2GB")
        windows = torch.randint(0, cfg.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        gc.collect()
        base = proc_bytes("/proc/self/status", "VmRSS") or 0  # the peak is reported above this
        t0 = time.perf_counter()
        model = svdkern.compress_from_disk(
            os.path.join(tmp, "src"), os.path.join(tmp, "out"), "svd-llm", 0.4, calib=windows, dtype=dtype,
            device=device, batch_size=8, progress=False, log=lambda *_: None,
            **({"svd_dtype": torch.float32} if device == "cuda" else {}))
        seconds = time.perf_counter() - t0
    report = model._svdkern_report
    return {"layers": layers, "seconds": seconds, "stages": report.stage_seconds,
            "peak_host": report.peak_host_bytes - base,
            "peak_device": report.peak_memory_bytes if device == "cuda" else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=None, help="divide LLaMA-7B's widths by this "
                    "(default: 1 on a GPU, 4 on the CPU)")
    ap.add_argument("--layers", type=int, default=2, help="the smaller depth L (2L is the other)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=256 * 2048,
                    help="calibration tokens of the estimated runs (default: SVD-LLM's 256 x 2048)")
    ap.add_argument("--link-gbs", type=float, default=100.0,
                    help="assumed all-reduce bus bandwidth between the eight devices, GB/s")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run:
        args.scale, args.layers, args.nsamples, args.seqlen = 32, 1, 8, 128
    scale = args.scale or (1 if device == "cuda" else 4)
    if args.child is not None:
        print(json.dumps(child(scale, args.child, args.nsamples, args.seqlen, device)))
        return
    runs = {}
    for layers in (args.layers, 2 * args.layers):
        cmd = [sys.executable, __file__, "--child", str(layers), "--scale", str(scale),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)] + (["--dry-run"] if args.dry_run else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        runs[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(runs[layers]), flush=True)
        # rewritten (atomically) after each run: one stopped at its time limit keeps the first
        lines = table(runs, args, scale, device)
        name = "scale_estimate_dry_run.md" if args.dry_run else f"scale_estimate_{device}.md"
        write_text(os.path.join(args.out, name), "\n".join(lines) + "\n")
    print("\n".join(lines))


def table(runs: dict, args, scale: int, device: str) -> list[str]:
    """The measured runs' table, then (once both depths ran) the per-layer costs and the estimates."""
    L, L2 = args.layers, 2 * args.layers
    hidden, inter, kv, _, vocab = SHAPES["LLaMA-7B"]
    measured = (hidden // scale, inter // scale, kv // scale)
    cuda = device == "cuda"
    lines = ["# Compressing LLaMA-7B and LLaMA-70B: memory and time, estimated from measured layers",
             "", f"Measured {provenance()}, device {device}"
             + (f" ({torch.cuda.get_device_name()})" if cuda else "") + ". Command: "
             f"`python benchmarks/estimate_scale.py --scale {scale} --layers {L}`. SVD-LLM at ratio 0.4, "
             f"streamed from bf16 shards, {'bf16 layers, fp32 SVDs' if cuda else 'fp32 layers, fp64 SVDs'}.",
             "", f"## Measured: LLaMA-7B shapes / {scale} (hidden {measured[0]}, intermediate {measured[1]}), "
             f"{args.nsamples} x {args.seqlen} calibration tokens", "",
             "| layers | seconds | " + " | ".join(STAGES) + " | peak host MiB above start | peak device MiB |",
             "|---|---|" + "---|" * len(STAGES) + "---|---|"]
    for n in (L, L2):
        if n not in runs:
            return lines + ["", f"The {L2}-layer run did not finish: no per-layer cost, no estimate."]
        r = runs[n]
        lines.append(f"| {n} | {r['seconds']:.1f} | " + " | ".join(f"{r['stages'].get(s, 0.0):.2f}" for s in STAGES)
                     + f" | {r['peak_host'] / 2**20:.0f} | "
                     + (f"{r['peak_device'] / 2**20:.0f} |" if r["peak_device"] else "- |"))
    tokens, micro = args.nsamples * args.seqlen, 8 * args.seqlen
    per_layer = {}
    for stage, kind in STAGES.items():
        grown = runs[L2]["stages"].get(stage, 0.0) - runs[L]["stages"].get(stage, 0.0)
        per_layer[kind] = per_layer.get(kind, 0.0) + max(grown, 0.0) / L
    w = work(*measured)
    unit = {"forward": per_layer["forward"] / (tokens * w["forward"]),
            "statistics": per_layer["statistics"] / (tokens * w["statistics"]),
            "solves": per_layer["solves"] / w["solves"], "io": per_layer["io"] / w["io"]}
    itemsize, solve_itemsize = (2, 4) if cuda else (4, 8)
    peak_key = "peak_device" if cuda else "peak_host"
    peak = max(runs[L][peak_key], runs[L2][peak_key])
    # on a GPU the device holds one micro-batch's activations; on the CPU the host holds them all
    ratio = peak / working_set(*measured, vocab // scale, micro if cuda else tokens, itemsize, solve_itemsize)
    gib = 2 ** 30
    lines += ["", f"Per layer: forward {per_layer['forward']:.2f} s, statistics {per_layer['statistics']:.2f} s, "
              f"solves {per_layer['solves']:.2f} s, shard I/O {per_layer['io']:.2f} s. Peak "
              f"{'device' if cuda else 'host'} memory from {L} to {L2} layers grew by "
              f"{(runs[L2][peak_key] - runs[L][peak_key]) / 2**20:.0f} MiB (bounded by one layer, it should "
              f"not grow); measured peak / analytic working set {ratio:.2f}.", "",
              f"## Estimated, {args.calib_tokens:,} calibration tokens", "",
              "| model | devices | forward + statistics h | solves h | shard I/O h | all-reduce h | total h | "
              "peak host GiB per device | peak device GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (h, i, k, depth, voc) in SHAPES.items():
        target = work(h, i, k)
        layer_bf16 = 2 * target["forward"]
        for devices in (1, 8):
            share = args.calib_tokens // devices
            fwd = depth * share * (unit["forward"] * target["forward"] + unit["statistics"] * target["statistics"])
            solves = depth * unit["solves"] * solve_critical_path(h, i, k, devices)
            io = depth * unit["io"] * target["io"]
            comm = depth * 2 * 4 * target["statistics"] / (args.link_gbs * 1e9) if devices > 1 else 0.0
            if cuda:  # analytic host side: the stream and its successor in fp32, a layer read in bf16
                host = (2 * 4 * share * h + 2 * layer_bf16) / gib
                dev = f"{ratio * working_set(h, i, k, voc, micro, itemsize, solve_itemsize) / gib:.1f}"
            else:
                host, dev = ratio * working_set(h, i, k, voc, share, itemsize, solve_itemsize) / gib, "-"
            lines.append(f"| {name} | {devices} | {fwd / 3600:.2f} | {solves / 3600:.2f} | {io / 3600:.3f} | "
                         f"{comm / 3600:.3f} | {(fwd + solves + io + comm) / 3600:.2f} | {host:.0f} | {dev} |")
    lines += ["", "Each stage's measured seconds per unit of work times the work at the target shape (see the "
              "script's docstring); one-time costs (capture of the first layer's input, the final save) are "
              f"left out. All-reduce at an assumed {args.link_gbs:g} GB/s. Eight devices still solve each "
              "layer's seven matrices on seven ranks, so the solves shrink less than the forward passes."]
    return lines


if __name__ == "__main__":
    main()
