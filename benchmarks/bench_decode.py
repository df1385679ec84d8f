"""End-to-end decode tokens/s with CUDA graphs: fused vs unfused low-rank vs dense (issue 5).

    python benchmarks/bench_decode.py [--new-tokens 128]

Models: SmolLM2-135M and a Llama-7B-shaped random-weight model (4 layers), each compressed at
ratio 0.4 (plain SVD: decode speed does not depend on which method chose the factors), bf16,
batch 1, static KV cache, `torch.compile(mode="reduce-overhead")` (CUDA graphs).
"""
import argparse
import copy
import os
import time

import torch

import svdkern
from _harness import header, require_cuda, write_csv


def tokens_per_s(model, new_tokens: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    model.forward = step
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static")
    model.generate(ids, **kwargs)  # compile + capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def models():
    small, _ = svdkern.load_model("smollm2", torch.bfloat16, "cuda")
    yield "SmolLM2-135M", small
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=32, num_hidden_layers=4, vocab_size=32000)
    yield "Llama-7B-shaped (4 layers)", AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()


def main():
    require_cuda(__file__)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    meta, rows = header(), []
    for name, dense in models():
        low = svdkern.compress(copy.deepcopy(dense), "svd", 0.4, progress=False)
        result = {"dense": tokens_per_s(dense, args.new_tokens)}
        os.environ["SVDKERN_IMPL"] = "torch"
        result["unfused"] = tokens_per_s(copy.deepcopy(low), args.new_tokens)
        os.environ["SVDKERN_IMPL"] = "auto"
        result["fused"] = tokens_per_s(low, args.new_tokens)
        rows.append({**meta, "model": name, **{f"{k}_tok_s": round(v, 1) for k, v in result.items()},
                     "fused_vs_dense": round(result["fused"] / result["dense"], 3),
                     "fused_vs_unfused": round(result["fused"] / result["unfused"], 3)})
        print(rows[-1], flush=True)
        del dense, low
        torch.cuda.empty_cache()
    write_csv(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"decode_{meta['gpu'].replace(' ', '_')}.csv"), rows)


if __name__ == "__main__":
    main()
