"""`svdkern compress | eval | info | bench | generate`: the command-line front of the Python API.

Plain `svdkern compress` compresses the bundled SmolLM2-135M with the `best` method at ratio 0.2
on WikiText-2 calibration windows, prints the dense and compressed perplexity and saves the
model to ./smollm2-best-0.2 (minutes on a laptop CPU).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys

import torch

from . import distributed
from .preflight import PreflightError, check_model_fits, check_positive
from .presets import DEFAULT_METHOD, LAYER_POLICIES, PRESETS, config_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_range(text: str):
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def _parse_floats(text: str):
    return tuple(float(v) for v in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p = argparse.ArgumentParser(prog="svdkern", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a causal LM and save it", **fmt,
                       description="Compress a causal LM's decoder linears into low-rank factors, "
                                   "compare perplexity with the dense model, and save the result.")
    c.add_argument("--model", default="smollm2",
                   help="HF id or directory, a .gguf file, or 'smollm2' (bundled, the default)")
    c.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(PRESETS),
                   help=f"compression method (default {DEFAULT_METHOD}: svdkern's most accurate "
                        "composition: EP's two streams, ranks by Fisher sensitivity, output-aware whitening, "
                        "3 epochs of end-to-end tuning; svd-llm is the fastest whitened one)")
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
    c.add_argument("--output-weighting", type=float, default=None, metavar="POWER",
                   help="output-aware whitening: weigh each output channel in the solve by its measured "
                        "Fisher sensitivity to this power (0 = off, 1 = the diagonal-Fisher loss)")
    c.add_argument("--refine-epochs", type=int, default=None,
                   help="block refinement: passes of Adam steps on each block's factors (0 = off)")
    c.add_argument("--refine-lr", type=float, default=None, help="block refinement step size")
    c.add_argument("--holdout-batches", type=int, default=None,
                   help="calibration micro-batches held out to choose alpha and refinement steps")
    c.add_argument("--tune-epochs", type=int, default=None,
                   help="end-to-end tuning after the layer-wise solve: epochs of AdamW on the factors toward "
                        "the dense model's next-token distributions (0 = off; best: 3; needs the model in memory)")
    c.add_argument("--tune-lr", type=float, default=None, help="end-to-end tuning peak learning rate")
    c.add_argument("--tune-batch", type=int, default=None, help="end-to-end tuning: windows per step")
    c.add_argument("--tune-holdout", type=int, default=None,
                   help="end-to-end tuning: last calibration windows held out to choose the kept epoch")
    c.add_argument("--tune-topk", type=int, default=None,
                   help="end-to-end tuning: dense tokens per position kept as targets (the rest is one bucket)")
    c.add_argument("--tune-norms", action="store_true", default=None,
                   help="end-to-end tuning also trains norm weights and the compressed linears' biases")
    _add_run_args(c)
    c.add_argument("--rank-align", type=_parse_align, default=None, metavar="auto|1|8|16|32|64",
                   help="move ranks to multiples of this for aligned GPU kernel loads: each rounded down "
                        "(auto, the default: 64…8 where it drops at most 2%% of the rank), then what that frees "
                        "given back in whole steps within the same budget; 1: the papers' ranks")
    c.add_argument("--checkpoint-dir", default=None,
                   help="per-layer checkpoints for resuming (default: <out>.partial; under torchrun, on a file "
                        "system every rank reads)")
    c.add_argument("--no-checkpoint", action="store_true")
    c.add_argument("--eval-windows", type=int, default=64,
                   help="windows of the dense/compressed perplexity printed at the end")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity comparison")
    c.add_argument("--save-dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="dtype of the saved tensors; auto: the model's, but bfloat16 for a model run in "
                        "float32 from a half-precision or quantized (GGUF) source")
    c.add_argument("--report", action="store_true",
                   help="also write report.png (per-layer truncation error and rank) into --out")
    c.add_argument("--stream-from-disk", action="store_true",
                   help="for a model larger than memory (a directory of safetensors shards): read one "
                        "decoder layer at a time, write each compressed layer as its own shard; no "
                        "perplexity comparison (run `svdkern eval` on the result)")

    e = sub.add_parser("eval", help="perplexity on consecutive non-overlapping windows, or zero-shot "
                                     "accuracy through lm-eval (--tasks)", **fmt)
    e.add_argument("model", help="svdkern directory, HF id/dir, .gguf file or 'smollm2'")
    e.add_argument("--data", default="wikitext2", help="'wikitext2' (test split) or a text file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="only the first W windows")
    e.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="zero-shot tasks instead of perplexity: lm-eval names (arc_easy, piqa, ...) or "
                        "paths to task YAML files; needs `pip install 'svdkern[eval]'`")
    e.add_argument("--limit", type=int, default=None, help="with --tasks: only the first N items of each task")
    e.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="a model larger than memory: keep what fits and read the other layers from DIR "
                        "during the forward (accelerate's disk offload; slow, bounded memory)")
    e.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="with --offload-dir: host memory for weights, e.g. 64GiB (default: what is free)")
    _add_run_args(e)

    i = sub.add_parser("info", help="describe a saved compressed model", **fmt)
    i.add_argument("directory")
    i.add_argument("--json", action="store_true", help="print the raw svdkern.json instead")
    i.add_argument("--plot", default=None, metavar="PNG", help="also plot per-layer error and rank here")

    b = sub.add_parser("bench", help="prefill/decode tokens per second and peak memory, dense vs compressed",
                       **fmt)
    b.add_argument("model", help="svdkern directory (or any model load_model takes)")
    b.add_argument("--dense", default="source",
                   help="the dense model to compare with: 'source' (the one it was compressed from), "
                        "a model spec, or 'none'")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", action="store_true", help="print the numbers as JSON")
    _add_run_args(b)

    g = sub.add_parser("generate", help="what the compressed model says (and the dense one, with --dense)",
                       **fmt)
    g.add_argument("model", help="svdkern directory (or any model load_model takes)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dense", action="store_true", help="also answer with the source model")
    g.add_argument("--no-chat-template", action="store_true",
                   help="continue the prompt as plain text (default: through the tokenizer's chat template, "
                        "when it has one)")
    _add_run_args(g)
    return p


def _add_run_args(p):
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=8)


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _eval_windows(tokenizer, data: str, seqlen: int, windows):
    """(windows, description of the text they come from)."""
    from .data import eval_windows, text_source, tokenize

    text, described = text_source(data, "test")
    return eval_windows(tokenize(tokenizer, text), seqlen, windows), described


def _check_run_args(args, data_sources=()) -> None:
    """Everything checkable without the model, before anything loads (one line on failure)."""
    from .preflight import (check_context_early, check_model_source, check_positive, check_text_source,
                            go_offline_if_unreachable)

    if args.seqlen < 2:
        raise PreflightError(f"--seqlen must be at least 2 to predict a token; got {args.seqlen}")
    check_positive(batch_size=args.batch_size, nsamples=getattr(args, "nsamples", None),
                   eval_windows=getattr(args, "eval_windows", None), windows=getattr(args, "windows", None))
    for source in data_sources:
        check_text_source(source, args.seqlen)
    if _needs_hub(args.model):
        go_offline_if_unreachable()
    check_model_source(args.model)
    check_context_early(args.model, args.seqlen)


def _needs_hub(model: str) -> bool:
    """Whether the model comes from the hub (WikiText-2 ships with svdkern; other texts are files)."""
    return not (model == "smollm2" or os.path.exists(os.path.expanduser(model)))


def _check_fits(model, args, stream, eval_batch, cfg=None) -> None:
    from .models import architecture_of
    from .pipeline import block_linear_params
    from .preflight import check_context, check_memory, estimate_memory

    check_context(model.config, args.seqlen)
    nsamples = getattr(args, "nsamples", 0)
    tune_params = 0
    if cfg is not None and cfg.tune_epochs:  # the factors keep about (1 - ratio) of the linears
        arch = architecture_of(model)
        tune_params = int((1 - cfg.ratio) * block_linear_params(model.get_submodule(arch.layers_path), arch))
    check_memory(estimate_memory(model, stream, nsamples, args.seqlen, eval_batch, _device(args),
                                 tune_params=tune_params, tune_topk=cfg.tune_topk if cfg else 0), _device(args))


def _join_process_group(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the group (NCCL on GPUs, gloo on CPUs); this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or distributed.world() > 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:  # one GPU per rank: NCCL's collectives (and broadcast_object_list) use the current device
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo")
    atexit.register(torch.distributed.destroy_process_group)
    return f"cuda:{local}" if cuda else device


def _parse_align(text: str):
    """auto or a number; which numbers are allowed is CompressionConfig's check (one line)."""
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or a number; got {text!r}")
    return text if text == "auto" else int(text)


def cmd_compress(args) -> int:
    from .api import compress, load_model
    from .evaluate import perplexity
    from .io import save

    device = _join_process_group(_device(args))
    lead = distributed.rank() == 0  # under torchrun: rank 0 evaluates, prints and saves
    out = args.out or f"./{os.path.basename(args.model.rstrip('/')).replace('.gguf', '')}-{args.method}-{args.ratio}"
    if os.path.exists(out) and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite or another --out", file=sys.stderr)
        return 2
    from .io import check_replaceable

    try:
        check_replaceable(os.path.abspath(out), args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    knobs = {"beta": args.alpha, "residual_beta": args.beta, "aces_range": args.aces_range,
             "plc_step": args.plc_step, "plc_samples": args.plc_samples, "whitening": args.whitening,
             "beta_grid": args.alpha_grid, "layer_policy": args.policy,
             "sensitivity_samples": args.sensitivity_samples, "min_rank_fraction": args.min_rank_fraction,
             "output_weighting": args.output_weighting,
             "refine_epochs": args.refine_epochs, "refine_lr": args.refine_lr,
             "holdout_batches": args.holdout_batches, "rank_align": args.rank_align,
             "tune_epochs": args.tune_epochs, "tune_lr": args.tune_lr, "tune_batch": args.tune_batch,
             "tune_holdout": args.tune_holdout, "tune_topk": args.tune_topk, "tune_norms": args.tune_norms}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    cfg = config_for(args.method, args.ratio, **knobs)  # bad knobs fail here, before the model loads
    if cfg.tune_epochs and args.nsamples >= 1:  # (a count below 1 is refused as such below)
        from .tune import split_windows

        try:
            split_windows(args.nsamples, cfg.tune_holdout)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
    if args.stream_from_disk:
        if cfg.tune_epochs:
            raise PreflightError("end-to-end tuning trains the whole model at once, so it cannot stream layers from "
                                 "disk: drop --stream-from-disk (the compressed model must fit in memory) or pass "
                                 "--tune-epochs 0")
        return _compress_streamed(args, cfg, knobs, out, device)
    _check_run_args(args, [args.calib] + ([] if args.no_eval else ["wikitext2"]))
    check_model_fits(args.model, DTYPES[args.dtype].itemsize)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device)
    eval_batch = None if args.no_eval else min(4, args.eval_windows)  # perplexity()'s batch
    _check_fits(model, args, cfg.stream if cfg.whitening else None, eval_batch, cfg)
    if cfg.whitening is not None:  # a text too short for the windows fails now, not after the dense evaluation
        from .data import calibration_windows

        calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, args.sampler)
    ckpt = None if args.no_checkpoint else args.checkpoint_dir or out.rstrip("/") + ".partial"
    windows = None
    if not args.no_eval and lead:
        windows, described = _eval_windows(tokenizer, "wikitext2", args.seqlen, args.eval_windows)
        dense = _dense_perplexity(model, windows, described, args, ckpt, device)
        print(f"dense model: {dense} on {described}")
    compress(model, args.method, args.ratio, args.calib, tokenizer, args.nsamples, args.seqlen,
             args.seed, args.sampler, device, args.batch_size, ckpt, progress=lead, **knobs)
    if not lead:  # the other ranks hold the same factors; rank 0 writes them
        return 0
    report = model._svdkern_report
    print(f"{args.method} at ratio {args.ratio}: {report.summary()}")
    if windows is not None:
        after = perplexity(model, windows, device=device)
        print(f"compressed model: {after} on {described}")
        model._svdkern_eval = {"dense": dense.ppl, "compressed": after.ppl, "text": described}
        _forget_dense_perplexity(ckpt)
    save(model, out, tokenizer, overwrite=args.overwrite,
         dtype=None if args.save_dtype == "auto" else DTYPES[args.save_dtype])
    print(f"saved to {out}")
    if args.report:
        from .report import plot, read_metadata

        print(f"report plot: {plot(read_metadata(out), os.path.join(out, 'report.png'))}")
    return 0


def _compress_streamed(args, cfg, knobs, out, device) -> int:
    """`compress --stream-from-disk`: layers read from the shards one at a time (api.compress_from_disk)."""
    from .api import compress_from_disk
    from .shards import empty_model

    if not os.path.isdir(os.path.expanduser(args.model)):
        raise PreflightError(f"--stream-from-disk reads a model directory of safetensors shards; {args.model} "
                             "is not a directory (download it first, e.g. `hf download ID --local-dir DIR`)")
    _check_run_args(args, [args.calib])
    model, _ = empty_model(args.model, DTYPES[args.dtype])  # checks the shards' names; cheap
    _check_fits(model, args, cfg.stream if cfg.whitening else None, None)
    ckpt = None if args.no_checkpoint else args.checkpoint_dir or out.rstrip("/") + ".partial"
    lead = distributed.rank() == 0
    model = compress_from_disk(
        args.model, out, args.method, args.ratio, args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, sampler=args.sampler, dtype=DTYPES[args.dtype],
        save_dtype=None if args.save_dtype == "auto" else DTYPES[args.save_dtype], device=device,
        batch_size=args.batch_size, checkpoint_dir=ckpt, overwrite=args.overwrite, progress=lead, **knobs)
    if not lead:
        return 0
    print(f"{args.method} at ratio {args.ratio}: {model._svdkern_report.summary()}")
    print(f"saved to {out} (no perplexity while streaming: `svdkern eval {out}` where it fits)")
    if args.report:
        from .report import plot, read_metadata

        print(f"report plot: {plot(read_metadata(out), os.path.join(out, 'report.png'))}")
    return 0


DENSE_EVAL = "dense_eval.json"


def _dense_perplexity(model, windows, described, args, ckpt, device):
    """The dense model's perplexity, kept beside the checkpoints so a resumed run does not redo it."""
    from .evaluate import PerplexityResult, perplexity

    key = {"model": args.model, "dtype": args.dtype, "seqlen": args.seqlen,
           "windows": int(windows.shape[0]), "data": described}
    path = os.path.join(ckpt, DENSE_EVAL) if ckpt else None
    if path and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return PerplexityResult(**saved["result"])
    result = perplexity(model, windows, device=device)
    if path:
        os.makedirs(ckpt, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"key": key, "result": result.__dict__}, f)
        os.replace(path + ".tmp", path)
    return result


def _forget_dense_perplexity(ckpt) -> None:
    if ckpt and os.path.isfile(os.path.join(ckpt, DENSE_EVAL)):
        os.remove(os.path.join(ckpt, DENSE_EVAL))
        if not os.listdir(ckpt):
            os.rmdir(ckpt)


def cmd_eval(args) -> int:
    from .api import load_model
    from .evaluate import perplexity

    device = _device(args)
    if args.tasks:
        return _zero_shot(args, device)
    _check_run_args(args, [args.data])
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device, *_offload(args))
    _check_fits(model, args, None, min(args.batch_size, args.windows or args.batch_size))
    windows, described = _eval_windows(tokenizer, args.data, args.seqlen, args.windows)
    result = perplexity(model, windows, batch_size=args.batch_size, device=device)
    print(f"{result} on {described}")
    return 0 if result.nonfinite_windows == 0 else 1


def _offload(args) -> tuple:
    """(offload_dir, max_memory) for load_model; --max-memory alone is a mistake said in one line."""
    if args.max_memory is not None and args.offload_dir is None:
        raise PreflightError("--max-memory bounds what stays in memory when offloading: pass --offload-dir too")
    return args.offload_dir, args.max_memory


def _zero_shot(args, device) -> int:
    from .api import load_model
    from .zeroshot import accuracy_table, evaluate, task_names

    task_names(args.tasks)  # names and files checked before the model loads
    check_positive(limit=args.limit)
    _check_run_args(args)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device, *_offload(args))
    results = evaluate(model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                       device=device)
    print(accuracy_table(results))
    return 0


def cmd_info(args) -> int:
    from .io import check_directory
    from .report import plot, read_metadata, summary

    check_directory(args.directory)  # the checks `load` makes: a truncated weights file is an error here too
    meta = read_metadata(args.directory)
    print(json.dumps(meta, indent=1) if args.json else summary(args.directory, meta))
    if args.plot:
        print(f"plot: {plot(meta, args.plot)}")
    return 0


def _source_of(spec: str) -> str | None:
    from .report import read_metadata

    return ((read_metadata(spec).get("source") or {}).get("model")
            if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "svdkern.json")) else None)


def cmd_bench(args) -> int:
    from .api import load_model
    from .speed import measure, table

    device = _device(args)
    check_positive(prompt_tokens=args.prompt_tokens, batch=args.batch, repeats=args.repeats)
    if args.new_tokens < 2:
        raise PreflightError(f"--new-tokens must be at least 2 to time decode steps; got {args.new_tokens}")
    dense = {"none": None, "source": _source_of(args.model)}.get(args.dense, args.dense)
    if args.dense == "source" and dense is None:
        raise PreflightError(f"{args.model} names no source model to compare with: pass --dense MODEL or --dense none")
    names = [dense, args.model] if dense else [args.model]
    for name in names:
        _check_run_args(argparse.Namespace(**{**vars(args), "model": name, "seqlen": args.prompt_tokens}))
    rows = []
    for name in reversed(names):  # the smaller model first: memory freed after one is reused by the next
        model, _ = load_model(name, DTYPES[args.dtype], device)
        rows.insert(0, measure(model, name, args.prompt_tokens, args.new_tokens, args.batch, args.repeats))
        del model
        gc.collect()
    print(json.dumps([r.as_dict() for r in rows], indent=1) if args.json else table(rows))
    return 0


def cmd_generate(args) -> int:
    from .api import load_model

    device = _device(args)
    check_positive(max_new_tokens=args.max_new_tokens)
    names = [args.model] + ([_source_of(args.model) or args.model] if args.dense else [])
    if args.dense and names[1] == args.model:
        raise PreflightError(f"{args.model} names no source model to answer with --dense")
    for name in names:
        _check_run_args(argparse.Namespace(**{**vars(args), "model": name, "seqlen": 2}))
        model, tokenizer = load_model(name, DTYPES[args.dtype], device)
        if tokenizer.chat_template and not args.no_chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"]
        else:
            ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids.to(device), max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        print(f"--- {name}{' (dense)' if name != args.model else ''}:\n{answer}")
        del model
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "bench": cmd_bench,
                "generate": cmd_generate}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was saved has been said; no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
