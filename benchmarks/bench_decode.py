"""One decode step of a full decoder stack under CUDA graphs: fused vs unfused low-rank vs dense.

    python benchmarks/bench_decode.py [--layers 8] [--dry-run] [--out DIR]

A LLaMA-7B-shaped stack (hidden 4096, intermediate 11008, 32 heads; random weights: speed does not
depend on the values), bf16, built directly on the GPU, static KV cache filled with a 512-token
prompt, batch 1 and 8. Each step (the decoder layers and the final norm; not lm_head, which
compression leaves dense) is captured once as a CUDA graph and replayed, the way serving engines
run decode: HF `generate`'s Python overhead would hide the kernels. Every decoder linear becomes
a LowRankLinear at ratio 0.4 with the papers' rank ("raw") or rank_align=64's, warmed with
svdkern.warm_up before capture. Reports ms per step (graph replay, and eager, timed first so a
failed capture keeps it beside its error), the speedup over dense in each mode and the parameters
of the layers; each row is appended to results/decode_step_<GPU>.csv and .md as it is measured.
The cache goes in under the name the model's forward takes (`past_key_values` in transformers
5.17, `cache` in 5.25; a wrong name is swallowed by **kwargs and the steps silently run without
their context), and the prompt's tokens are checked to be in it.
--dry-run: a tiny stack on the CPU (Triton interpreter, eager only) so the script cannot rot.
"""
import inspect
import os
import time

import torch

import svdkern
from _harness import Rows, bench_device, bench_parser, header
from svdkern.models import set_submodule
from svdkern.nn import LowRankLinear
from svdkern.solvers.rank import aligned_rank, rank_for_ratio

RATIO = 0.4
PROMPT = 512
# The oldest transformers this was checked against (the GPU image's): StaticCache(config=,
# max_cache_len=) keeps its position on the device, so a captured step advances it on replay.
MIN_TRANSFORMERS = "5.17"
WARMUP, EAGER_STEPS, GRAPH_WARMUP, GRAPH_REPLAYS = 3, 20, 2, 50


def requirement() -> str:
    """One line naming the transformers version the decode step needs and how it passes the cache."""
    import transformers
    from transformers import LlamaModel

    return (f"decode step: needs transformers >= {MIN_TRANSFORMERS} (StaticCache on the device); found "
            f"{transformers.__version__}, which takes the KV cache as `{cache_kwarg(LlamaModel.forward)}=`")


def check_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise SystemExit(f"bench_decode.py needs transformers >= {MIN_TRANSFORMERS}; found {transformers.__version__}")


def cache_kwarg(forward) -> str:
    """The keyword under which `forward` takes the KV cache."""
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{getattr(forward, '__qualname__', forward)} takes neither `cache` nor `past_key_values`")


def build(layers: int, device, dtype, dry_run: bool):
    """The random-weight stack, made on `device` directly (no host copy of ~1.9B parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = (dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=128) if dry_run else
            dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000))
    cfg = AutoConfig.for_model("llama", num_hidden_layers=layers, max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


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


def decode_positions(forward, batch: int, prompt: int, device) -> dict:
    """The decode step's position inputs, for a forward that takes `cache_position` (HF's static-
    cache recipe): device tensors that each step advances in place (captured steps too, on
    replay), so no step builds them from a host value. {} for a forward that finds the position
    on the cache's device counter itself (transformers 5.17 and 5.25 take no cache_position)."""
    if "cache_position" not in inspect.signature(forward).parameters:
        return {}
    return {"cache_position": torch.full((1,), prompt, device=device, dtype=torch.long),
            "position_ids": torch.full((batch, 1), prompt, device=device, dtype=torch.long)}


def step_ms(model, batch: int, prompt: int, graphs: bool):
    """(graph ms, eager ms, capture error) of one decode step after a prompt of `prompt` tokens.

    Eager steps are timed first and kept whatever the capture does: a failed capture returns
    (None, eager ms, its error). Every step, eager or replayed, writes one more slot of the
    static cache (its position counter lives on the device and advances inside the graph too),
    so the cache holds exactly the steps taken: a replay past its end would write out of bounds.
    Attention runs over the whole static cache whatever the position, so every step costs the same.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    eager_steps = EAGER_STEPS if cuda else 1  # the interpreter is slow
    steps = WARMUP + eager_steps + (1 + GRAPH_WARMUP + GRAPH_REPLAYS if graphs else 0)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps)
    passed = {cache_kwarg(model.model.forward): cache}
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    taken = 0
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=True, **passed)
        if int(cache.get_seq_length()) != prompt:
            raise RuntimeError(f"the prompt did not reach the KV cache (it holds {int(cache.get_seq_length())} "
                               f"of {prompt} tokens): the model ignored {list(passed)[0]}=")
        token = ids[:, -1:].clone()
        positions = decode_positions(model.model.forward, batch, prompt, device)
        svdkern.warm_up(model, token_counts=(batch,))  # the kernels a captured step runs, loaded now

        def step():
            nonlocal taken
            taken += 1
            if taken > steps:
                raise RuntimeError(f"decode step {taken} would overflow the static cache of {steps} steps")
            out = model.model(input_ids=token, use_cache=True, **passed, **positions).last_hidden_state
            for position in positions.values():
                position.add_(1)
            return out

        for _ in range(WARMUP):
            step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(eager_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        eager = (time.perf_counter() - t0) * 1e3 / eager_steps
        if not graphs:
            return None, eager, None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()  # captured: each replay advances the cache by one, as counted here
        except Exception as exc:  # a failed capture is a finding: keep the eager time with it
            return None, eager, f"capture failed: {type(exc).__name__}: {exc}"[:300]
        taken += GRAPH_WARMUP + GRAPH_REPLAYS - 1
        for _ in range(GRAPH_WARMUP):  # the first replays upload the graph
            graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(GRAPH_REPLAYS):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / GRAPH_REPLAYS, eager, None


def speedup(dense_ms, ms):
    """dense / this, in one mode only (graph with graph, eager with eager), or None."""
    return round(dense_ms / ms, 3) if dense_ms and ms else None


def main():
    ap = bench_parser(__doc__)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    device = bench_device(args, __file__)
    check_transformers()
    print(requirement(), flush=True)
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    layers, prompt, batches = (2, 8, (1,)) if args.dry_run else (args.layers, PROMPT, (1, 8))
    meta = header()
    rows = Rows(args.out, "decode_step", meta, f"Decode step of a LLaMA-7B-shaped {layers}-layer stack (bf16)",
                f"Ratio {RATIO}; prompt {prompt} tokens in a static cache; x_dense_graph = dense graph "
                "replay / this graph replay, x_dense_eager = dense eager / this eager (never mixed).")
    fused_impl = "triton" if args.dry_run else "auto"
    dense = {}  # batch -> the dense stack's (graph ms, eager ms)
    for variant, align, impl in (("dense", None, "torch"), ("unfused raw", 1, "torch"),
                                 ("fused raw", 1, fused_impl), ("fused aligned 64", 64, fused_impl)):
        os.environ["SVDKERN_IMPL"] = impl
        model = build(layers, device, dtype, args.dry_run)
        if align is not None:
            to_low_rank(model, align)
        params = sum(p.numel() for p in model.model.layers.parameters())
        for batch in batches:
            try:
                graph, eager, error = step_ms(model, batch, prompt, graphs=not args.dry_run)
            except Exception as exc:  # e.g. the prompt missed the cache: record it, go on
                graph, eager, error = None, None, f"{type(exc).__name__}: {exc}"[:300]
            if variant == "dense":
                dense[batch] = (graph, eager)
            dense_graph, dense_eager = dense.get(batch, (None, None))
            rows.add({**meta, "layers": layers, "batch": batch, "variant": variant,
                      "graph_ms": None if graph is None else round(graph, 4),
                      "eager_ms": None if eager is None else round(eager, 4),
                      "layer_params_M": round(params / 1e6, 1),
                      "x_dense_graph": speedup(dense_graph, graph), "x_dense_eager": speedup(dense_eager, eager),
                      "error": error})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    os.environ["SVDKERN_IMPL"] = "auto"
    print(f"wrote {rows.csv} and .md")


if __name__ == "__main__":
    main()
