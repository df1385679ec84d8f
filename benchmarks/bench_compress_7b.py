"""SVD-LLM compression time of a Llama-7B-shaped model per Gram path, one GPU (issue 10).

    python benchmarks/bench_compress_7b.py [--nsamples 128] [--dry-run] [--out DIR]

Random weights, --layers decoder layers (4) of Llama-7B's shapes, nsamples x 2048 calibration tokens, bf16
model, fp32 statistics, fp32 SVDs. Each Gram path (SVDKERN_GRAM=blas: blocked cuBLAS panels;
ext: the compiled hand kernels, when built) runs in its own process, so neither inherits the
other's caches; each path's row is appended to results/compress_7b_<GPU>.md and .csv as it ends.
--dry-run: a tiny model on the CPU (the blas path only).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch


def one_run(dry_run: bool, nsamples: int, layers: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import svdkern

    device = "cpu" if dry_run else "cuda"
    dims = (dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=256) if dry_run else
            dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000))
    cfg = AutoConfig.for_model("llama", num_hidden_layers=layers if not dry_run else 2, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if not dry_run else torch.float32).eval()
    windows = torch.randint(0, cfg.vocab_size, (nsamples, 2048 if not dry_run else 64))
    if not dry_run:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    svdkern.compress(model, "svd-llm", 0.2, calib=windows, device=device, batch_size=8, progress=False,
                     svd_dtype=torch.float32)
    if not dry_run:
        torch.cuda.synchronize()
    return {"gram": os.environ.get("SVDKERN_GRAM", "blas"), "extension": svdkern.has_cuda_ext(),
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if not dry_run else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.dry_run, args.nsamples if not args.dry_run else 4, args.layers)))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_compress_7b.py needs a CUDA device; none is visible (--dry-run: the CPU).")
    from _harness import Rows, header

    meta = header()
    rows = Rows(args.out, "compress_7b", meta, f"SVD-LLM compression time, {args.layers} Llama-7B-shaped layers, "
                "per Gram path", "ext runs the extension's kernels only when it is built (extension: true).")
    for gram in (("blas",) if args.dry_run else ("blas", "ext")):
        cmd = ([sys.executable, __file__, "--child", "--nsamples", str(args.nsamples), "--layers", str(args.layers)]
               + (["--dry-run"] if args.dry_run else []))
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SVDKERN_GRAM": gram})
        if out.returncode:
            raise SystemExit(f"the {gram} run failed:\n{out.stderr[-3000:]}")
        rows.add({**meta, "layers": args.layers, "nsamples": args.nsamples,
                  **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"wrote {rows.md}")


if __name__ == "__main__":
    main()
