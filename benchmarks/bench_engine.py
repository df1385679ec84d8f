"""Peak memory and decoder-layer forwards of every method on a LLaMA-7B-shaped model (issue 13).

    python benchmarks/bench_engine.py                  # 7B shapes / 8 on the CPU (minutes)
    python benchmarks/bench_engine.py --scale 1        # LLaMA-7B's shapes (a GPU)
    python benchmarks/bench_engine.py --dry-run        # seconds, on the CPU (the GPU suite's check)

Random weights; each method runs in its own process, at two depths (L and 2L layers), so the
growth per layer shows whether memory is bounded by one layer (it should not grow) and the
forward count extrapolates to 32 layers. Forwards are counted with hooks on every decoder layer
(copies included; the staged executor's pass over a layer's parts counts as one forward): a
pass that reaches the layer's end is a full forward, one stopped by a
capture hook is an early exit, weighted by the share of the layer's dense linear parameters it
ran before stopping (so "forward equivalents" are comparable with full passes; the
sensitivity pass's backward is not counted). lm_head and the embeddings are not counted.
On the CPU, memory is glibc's heap in use (mallinfo2), sampled every 2 ms.
"""
import argparse
import json
import os
import ctypes
import subprocess
import sys
import threading
import time

import torch

from _common import RESULTS, provenance
from _harness import write_text

METHODS = ["svd-llm", "sc-svd-llm", "ep-svd-llm", "saes-svd", "erc-svd", "best"]


def build(scale: int, layers: int, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=4096 // scale, intermediate_size=11008 // scale,
                               num_attention_heads=32 // scale, num_key_value_heads=32 // scale,
                               num_hidden_layers=layers, vocab_size=32000 // scale,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


class HeapPeak:
    """Peak bytes in use on glibc's heap (arenas and mmapped blocks) while the block runs."""

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    def __init__(self):
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = self._Info

    def now(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        self.base = self.peak = self.now()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def child(method: str, scale: int, layers: int, nsamples: int, seqlen: int, device: str) -> dict:
    import svdkern

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(scale, layers, dtype).to(device)
    windows = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    started, finished = [0], [0]
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: started.__setitem__(0, started[0] + 1))
        layer.register_forward_hook(lambda *_: finished.__setitem__(0, finished[0] + 1))
    exits = _count_early_exits(model)
    from svdkern.staged import LlamaStages  # the staged executor runs a layer's parts, not the layer

    real_outputs = LlamaStages.outputs

    def counted_outputs(self):
        started[0] += len(self.hidden)
        finished[0] += len(self.hidden)
        return real_outputs(self)

    LlamaStages.outputs = counted_outputs
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with HeapPeak() as heap:
        svdkern.compress(model, method, 0.4, calib=windows, device=device, batch_size=8, progress=False,
                         log=lambda *_: None, **({"svd_dtype": torch.float32} if device == "cuda" else {}))
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else heap.peak - heap.base
    early = started[0] - finished[0]
    assert early == sum(exits["count"].values()), (early, exits)
    return {"method": method, "layers": layers, "full_forwards": finished[0], "early_exits": early,
            "early_exit_equivalents": exits["equivalents"], "peak_bytes_above_model": peak, "seconds": seconds}


def _count_early_exits(model) -> dict:
    """Wrap the engine's early-exit helper: count exits and their share of a dense forward."""
    import svdkern.blocks as blocks
    import svdkern.pipeline as pipeline
    from svdkern.models import architecture_of

    groups = architecture_of(model).groups
    layer0 = model.model.layers[0]
    params = [sum(layer0.get_submodule(n).weight.numel() for n in g) for g in groups]
    before = {g[0]: sum(params[:i]) / sum(params) for i, g in enumerate(groups)}
    stats = {"count": {}, "equivalents": 0.0}
    real = blocks.input_of

    def counted(layer, name, hidden, kwargs):
        stats["count"][name] = stats["count"].get(name, 0) + 1
        stats["equivalents"] += before[name]
        return real(layer, name, hidden, kwargs)

    blocks.input_of = pipeline.input_of = counted
    return stats


def extrapolate(small: dict, large: dict, n_small: int, n_large: int, key: str, to: int = 32) -> float:
    slope = (large[key] - small[key]) / (n_large - n_small)
    return large[key] + slope * (to - n_large)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=int, default=8, help="divide LLaMA-7B's widths by this")
    ap.add_argument("--layers", type=int, default=2, help="the smaller depth L (2L is the other)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=RESULTS, help="folder for the table (default benchmarks/results)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny run on the CPU (widths / 32, SVD-LLM)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:
        args.scale, args.layers, args.nsamples, args.seqlen, args.methods = 32, 1, 4, 128, "svd-llm"
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.child:
        method, layers = args.child.split(":")
        print(json.dumps(child(method, args.scale, int(layers), args.nsamples, args.seqlen, device)))
        return
    rows = []
    for method in args.methods.split(","):
        got = {}
        for layers in (args.layers, 2 * args.layers):
            cmd = [sys.executable, __file__, "--child", f"{method}:{layers}", "--scale", str(args.scale),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__), env=env)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            got[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(got[layers]), flush=True)
        rows.append((method, got[args.layers], got[2 * args.layers]))
        # rewritten (atomically) after every method: a run stopped at its time limit keeps its rows
        lines = table(rows, args, device)
        write_text(os.path.join(args.out, f"engine_memory_scale{args.scale}_{device}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def table(rows: list, args, device: str) -> list[str]:
    """The markdown table of the methods measured so far."""
    width = 4096 // args.scale
    lines = [f"# Peak memory and layer forwards per method (LLaMA-7B shapes / {args.scale}: hidden {width}, "
             f"intermediate {11008 // args.scale}; {args.nsamples}x{args.seqlen} calibration tokens; ratio 0.4)",
             "", f"Measured {provenance()}. Command: `python benchmarks/bench_engine.py --scale {args.scale} "
             f"--layers {args.layers}`.", "",
             f"Device: {device}. Peak is above the loaded model "
             f"({'max_memory_allocated' if device == 'cuda' else 'glibc heap in use, sampled every 2 ms'}). "
             "Forwards count every decoder-layer call, copies included; per layer = at 2L divided by 2L. An "
             "early exit counts as the share of the layer's dense linear parameters run before it.", "",
             f"| method | peak MiB at L={args.layers} | peak MiB at 2L={2 * args.layers} | growth per layer MiB "
             "| full forwards per layer | early exits per layer (in forwards) | forward equivalents at 32 layers "
             "(extrapolated) | seconds at 2L |",
             "|---|---|---|---|---|---|---|---|"]
    n1, n2 = args.layers, 2 * args.layers
    for method, small, large in rows:
        growth = (large["peak_bytes_above_model"] - small["peak_bytes_above_model"]) / (n2 - n1)
        total32 = (extrapolate(small, large, n1, n2, "full_forwards")
                   + extrapolate(small, large, n1, n2, "early_exit_equivalents"))
        lines.append(f"| {method} | {small['peak_bytes_above_model'] / 2**20:.0f} | "
                     f"{large['peak_bytes_above_model'] / 2**20:.0f} | {growth / 2**20:.0f} | "
                     f"{large['full_forwards'] / n2:.2f} | {large['early_exits'] / n2:.2f} "
                     f"({large['early_exit_equivalents'] / n2:.2f}) | {total32:.0f} | "
                     f"{large['seconds']:.1f} |")
    return lines + ["", "The floor is one full forward per layer and stream (SVD-LLM and SC 1, EP and SAES 2): "
                    "statistics can be gathered while a stream propagates. Early exits stop inside a layer, at the "
                    "input of the group being calibrated, so they cost a fraction of a forward."]


if __name__ == "__main__":
    main()
