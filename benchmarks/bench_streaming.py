"""Streaming from disk against the in-memory path on the bundled SmolLM2-135M (issue 12).

    python benchmarks/bench_streaming.py               # a few minutes on 2 CPU cores
    python benchmarks/bench_streaming.py --dry-run     # a tiny random model, seconds

SmolLM2 is saved as bf16 safetensors shards of 20 MB; each path then compresses it with SVD-LLM
in a fresh process: the in-memory path loads the whole model (`from_pretrained`), the streaming
path reads one decoder layer at a time (`compress_from_disk`). Reported: wall time, the peak
host memory above the process's resident size before the run (model loading included), the
model's size in the run's dtype, and whether the two saved models hold the same factors.
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

CHILD = """
import gc, json, sys, time, torch, svdkern
from svdkern.data import load_text, token_windows, tokenize
from svdkern.host import peak_rss, proc_bytes, reset_peak_rss
path, src, out, nsamples, seqlen = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(src)
windows = token_windows(tokenize(tokenizer, load_text("wikitext2", "calibration")), nsamples, seqlen, 0)
quiet = dict(progress=False, log=lambda *_: None, batch_size=8)
gc.collect()
base = proc_bytes("/proc/self/status", "VmRSS")
reset_peak_rss()
t0 = time.perf_counter()
if path == "disk":
    svdkern.compress_from_disk(src, out, "svd-llm", 0.2, calib=windows, save_dtype=torch.float32, **quiet)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    svdkern.compress(model, "svd-llm", 0.2, calib=windows, **quiet)
    svdkern.save(model, out, dtype=torch.float32)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_above_start": peak_rss() - base}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    import svdkern

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        if args.dry_run:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            from conftest import tiny_with_real_tokenizer

            model, tokenizer = tiny_with_real_tokenizer()
            args.nsamples, args.seqlen, args.repeats = 4, 64, 1
        else:
            model, tokenizer = svdkern.load_model("smollm2")
        model.to(torch.bfloat16).save_pretrained(src, max_shard_size="20MB")
        tokenizer.save_pretrained(src)
        params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
        rows = {"memory": [], "disk": []}
        for repeat in range(args.repeats):  # alternated, so a slow spell of the machine hits both
            for path in ("memory", "disk") if repeat % 2 == 0 else ("disk", "memory"):
                proc = subprocess.run([sys.executable, "-c", CHILD, path, src, os.path.join(tmp, f"{path}{repeat}"),
                                       str(args.nsamples), str(args.seqlen)], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                rows[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(path, rows[path][-1], flush=True)
        a, b = svdkern.load(os.path.join(tmp, "memory0")), svdkern.load(os.path.join(tmp, "disk0"))
        same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    mib = 2 ** 20
    lines = [f"# Streaming from disk vs in memory: {'a tiny model (dry run)' if args.dry_run else 'SmolLM2-135M'}, "
             "SVD-LLM at ratio 0.2", "",
             f"Measured {provenance()}. Command: `python benchmarks/bench_streaming.py`. Source: bf16 "
             f"safetensors in {shards} shards; runs in float32 ({params * 4 / mib:.0f} MiB of weights), "
             f"{args.nsamples} x {args.seqlen} calibration tokens from WikiText-2, each path in a fresh process.", "",
             f"| path | seconds (each of {args.repeats} runs, alternated) | peak host memory above start, MiB |",
             "|---|---|---|"]
    for path, label in (("memory", "in memory (from_pretrained, compress, save)"),
                        ("disk", "streamed from disk (compress_from_disk)")):
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in rows[path])
        lines.append(f"| {label} | {seconds} | {max(r['peak_above_start'] for r in rows[path]) / mib:.0f} |")
    lines += ["", f"Saved factors identical: {same}."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "streaming_dry_run.md" if args.dry_run else "streaming_smollm2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
