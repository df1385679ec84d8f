"""One decode step of a full decoder stack under CUDA graphs: fused vs unfused low-rank vs dense.

    python benchmarks/bench_decode.py [--layers 8] [--dry-run] [--out DIR]

A LLaMA-7B-shaped stack (hidden 4096, intermediate 11008, 32 heads; random weights: speed does not
depend on the values), bf16, static KV cache filled with a 512-token prompt, batch 1 and 8. Each
step (the decoder layers and the final norm; not lm_head, which compression leaves dense) is
captured once as a CUDA graph and replayed, the way serving engines run decode: HF `generate`'s
Python overhead would hide the kernels. Every decoder linear becomes a LowRankLinear at ratio
0.4 with the papers' rank ("raw") or rank_align=64's. Reports ms per step (graph replay, and
eager), the speedup over dense and the parameters of the layers.
--dry-run: a tiny stack on the CPU (Triton interpreter, eager only) so the script cannot rot.
"""
import os

import torch

from _harness import bench_device, bench_parser, header, results_path, write_csv, write_markdown
from svdkern.models import set_submodule
from svdkern.nn import LowRankLinear
from svdkern.solvers.rank import aligned_rank, rank_for_ratio

RATIO = 0.4
PROMPT = 512


def build(layers: int, device, dtype, dry_run: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = (dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=128) if dry_run else
            dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000))
    cfg = AutoConfig.for_model("llama", num_hidden_layers=layers, max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def to_low_rank(model, align):
    """Every decoder linear as random factors at the ratio's rank (aligned down to `align`)."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            m, n = module.weight.shape
            k = aligned_rank(rank_for_ratio(m, n, RATIO), align)
            kw = dict(device=module.weight.device, dtype=module.weight.dtype)
            low = LowRankLinear.from_factors(torch.randn(m, k, **kw) / k ** 0.5, torch.randn(k, n, **kw) / n ** 0.5)
            set_submodule(model.model.layers, name, low)
    return model


WARMUP, EAGER_STEPS, GRAPH_WARMUP, GRAPH_REPLAYS = 3, 20, 2, 50


def step_ms(model, batch: int, prompt: int, graphs: bool):
    """(graph ms, eager ms) of one decode step after a prompt of `prompt` tokens.

    Every step, eager or replayed, writes one more slot of the static cache (its position
    counter lives on the device and advances inside the graph too), so the cache holds exactly
    the steps taken: a replay past its end would write out of bounds. Attention runs over the
    whole static cache whatever the position, so every step costs the same.
    """
    import time

    from transformers import StaticCache

    device = next(model.parameters()).device
    eager_steps = EAGER_STEPS if device.type == "cuda" else 1  # the interpreter is slow
    steps = WARMUP + eager_steps + (1 + GRAPH_WARMUP + GRAPH_REPLAYS if graphs else 0)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    taken = 0
    with torch.no_grad():
        model.model(input_ids=ids, cache=cache, use_cache=True)
        token = ids[:, -1:].clone()

        def step():
            nonlocal taken
            taken += 1
            if taken > steps:
                raise RuntimeError(f"decode step {taken} would overflow the static cache of {steps} steps")
            return model.model(input_ids=token, cache=cache, use_cache=True).last_hidden_state

        for _ in range(WARMUP):  # compile and autotune outside any capture
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(eager_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        eager = (time.perf_counter() - t0) * 1e3 / eager_steps
        if not graphs:
            return None, eager
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()  # captured: each replay advances the cache by one, as counted here
        taken += GRAPH_WARMUP + GRAPH_REPLAYS - 1
        for _ in range(GRAPH_WARMUP):  # the first replays upload the graph
            graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(GRAPH_REPLAYS):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / GRAPH_REPLAYS, eager


def main():
    ap = bench_parser(__doc__)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    device = bench_device(args, __file__)
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    layers, prompt, batches = (2, 8, (1,)) if args.dry_run else (args.layers, PROMPT, (1, 8))
    meta, rows = header(), []
    fused_impl = "triton" if args.dry_run else "auto"
    for batch in batches:
        results = {}
        for variant, align, impl in (("dense", None, "torch"), ("unfused raw", 1, "torch"),
                                     ("fused raw", 1, fused_impl), ("fused aligned 64", 64, fused_impl)):
            os.environ["SVDKERN_IMPL"] = impl
            model = build(layers, device, dtype, args.dry_run)
            if align is not None:
                to_low_rank(model, align)
            params = sum(p.numel() for p in model.model.layers.parameters())
            try:
                graph, eager = step_ms(model, batch, prompt, graphs=not args.dry_run)
                error = None
            except Exception as exc:  # a failed capture is a finding: record it, go on
                graph, eager, error = None, None, f"{type(exc).__name__}: {exc}"[:200]
            results[variant] = graph if graph is not None else eager
            rows.append({**meta, "layers": layers, "batch": batch, "variant": variant,
                         "graph_ms": None if graph is None else round(graph, 4),
                         "eager_ms": None if eager is None else round(eager, 4),
                         "layer_params_M": round(params / 1e6, 1), "error": error})
            print(rows[-1], flush=True)
            del model
        for row in rows[-4:]:
            mine = results[row["variant"]]
            row["x_dense"] = None if not (mine and results["dense"]) else round(results["dense"] / mine, 3)
    os.environ["SVDKERN_IMPL"] = "auto"
    csv_path = results_path(args.out, "decode_step", meta["gpu"], "csv")
    write_csv(csv_path, rows)
    write_markdown(csv_path[:-4] + ".md", f"Decode step of a LLaMA-7B-shaped {layers}-layer stack (bf16)",
                   meta, rows, f"Ratio {RATIO}; prompt {prompt} tokens in a static cache; x_dense = dense "
                   "step time / this step time (graph replay when captured, else eager).")
    print(f"wrote {csv_path} and .md")


if __name__ == "__main__":
    main()
