"""`svdkern compress | eval | info`: the command-line front of the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .presets import DEFAULT_METHOD, LAYER_POLICIES, PRESETS, config_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_range(text: str):
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def _parse_floats(text: str):
    return tuple(float(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdkern", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a causal LM and save it")
    c.add_argument("--model", default="smollm2",
                   help="HF id or directory, a .gguf file, or 'smollm2' (bundled, the default)")
    c.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(PRESETS),
                   help=f"compression method (default {DEFAULT_METHOD}: svdkern's most accurate "
                        "composition; svd-llm is the fastest whitened one)")
    c.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters removed per matrix")
    c.add_argument("--calib", default="wikitext2", help="'wikitext2' or a text file")
    c.add_argument("--nsamples", type=int, default=64)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--sampler", default="token-windows", choices=["token-windows", "svd-llm"])
    c.add_argument("--out", default=None, help="output directory (default: ./<model>-<method>-<ratio>)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--alpha", type=float, default=None, help="EP/CEALC correction strength (default 0.5); two-stream methods (ep-svd-llm, best)")
    c.add_argument("--beta", type=float, default=None, help="REC residual rank factor (erc-svd default 0.05); with "
                   "another method it adds REC's residual stage to it")
    c.add_argument("--aces-range", type=_parse_range, default=None, metavar="LO,HI",
                   help="SAES-SVD interval for the adaptive beta (default 0.25,0.75)")
    c.add_argument("--plc-step", type=int, default=None, help="ERC-SVD PLC search step (default 2)")
    c.add_argument("--plc-samples", type=int, default=None,
                   help="calibration windows used by the PLC search (default: all)")
    c.add_argument("--whitening", default=None, choices=["cholesky", "eigh"])
    c.add_argument("--alpha-grid", type=_parse_floats, default=None, metavar="A,B,...",
                   help="choose the EP/CEALC strength per matrix from these values on held-out "
                        "calibration batches (two-stream methods; replaces --alpha)")
    c.add_argument("--policy", default=None, choices=LAYER_POLICIES,
                   help="rank allocation: uniform, plc (ERC's last-k layers), v2 (SVD-LLM V2), "
                        "sensitivity (Fisher-weighted water-filling); all keep the uniform budget")
    c.add_argument("--sensitivity-samples", type=int, default=None,
                   help="calibration windows of the sensitivity measurement (default: all)")
    c.add_argument("--min-rank-fraction", type=float, default=None,
                   help="sensitivity policy: no matrix below this fraction of its uniform rank")
    c.add_argument("--refine-epochs", type=int, default=None,
                   help="block refinement: passes of Adam steps on each block's factors (0 = off)")
    c.add_argument("--refine-lr", type=float, default=None, help="block refinement step size")
    c.add_argument("--holdout-batches", type=int, default=None,
                   help="calibration micro-batches held out to choose alpha and refinement steps")
    _add_run_args(c)
    c.add_argument("--checkpoint-dir", default=None,
                   help="per-layer checkpoints for resuming (default: <out>.partial)")
    c.add_argument("--no-checkpoint", action="store_true")
    c.add_argument("--eval-windows", type=int, default=64,
                   help="windows of the dense/compressed perplexity printed at the end")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity comparison")

    e = sub.add_parser("eval", help="perplexity on consecutive non-overlapping windows")
    e.add_argument("model", help="svdkern directory, HF id/dir, .gguf file or 'smollm2'")
    e.add_argument("--data", default="wikitext2", help="'wikitext2' (test split) or a text file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="only the first W windows")
    _add_run_args(e)

    i = sub.add_parser("info", help="describe a saved compressed model")
    i.add_argument("directory")
    return p


def _add_run_args(p):
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=8)


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _eval_windows(tokenizer, data: str, seqlen: int, windows):
    from .data import eval_windows, load_text, tokenize

    return eval_windows(tokenize(tokenizer, load_text(data, "test")), seqlen, windows)


def cmd_compress(args) -> int:
    from .api import compress, load_model
    from .evaluate import perplexity
    from .io import save

    device = _device(args)
    out = args.out or f"./{os.path.basename(args.model.rstrip('/')).replace('.gguf', '')}-{args.method}-{args.ratio}"
    if os.path.exists(out) and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite or another --out", file=sys.stderr)
        return 2
    knobs = {"beta": args.alpha, "residual_beta": args.beta, "aces_range": args.aces_range,
             "plc_step": args.plc_step, "plc_samples": args.plc_samples, "whitening": args.whitening,
             "beta_grid": args.alpha_grid, "layer_policy": args.policy,
             "sensitivity_samples": args.sensitivity_samples, "min_rank_fraction": args.min_rank_fraction,
             "refine_epochs": args.refine_epochs, "refine_lr": args.refine_lr,
             "holdout_batches": args.holdout_batches}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    config_for(args.method, args.ratio, **knobs)  # bad knobs fail here, before the model loads
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device)
    windows = None if args.no_eval else _eval_windows(tokenizer, "wikitext2", args.seqlen, args.eval_windows)
    if windows is not None:
        dense = perplexity(model, windows, device=device)
        print(f"dense model: {dense}")
    ckpt = None if args.no_checkpoint else (args.checkpoint_dir or out.rstrip("/") + ".partial")
    compress(model, args.method, args.ratio, args.calib, tokenizer, args.nsamples, args.seqlen,
             args.seed, args.sampler, device, args.batch_size, ckpt, **knobs)
    report = model._svdkern_report
    print(f"{args.method} at ratio {args.ratio}: {report.summary()}")
    if windows is not None:
        print(f"compressed model: {perplexity(model, windows, device=device)}")
    save(model, out, tokenizer, overwrite=args.overwrite)
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from .api import load_model
    from .evaluate import perplexity

    device = _device(args)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device)
    windows = _eval_windows(tokenizer, args.data, args.seqlen, args.windows)
    result = perplexity(model, windows, batch_size=args.batch_size, device=device)
    print(result)
    return 0 if result.nonfinite_windows == 0 else 1


def cmd_info(args) -> int:
    from .io import METADATA

    with open(os.path.join(args.directory, METADATA)) as f:
        meta = json.load(f)
    ranks = meta.pop("ranks")
    print(json.dumps(meta, indent=1))
    print(f"{len(ranks)} low-rank modules; distinct ranks: {sorted(set(ranks.values()))}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
