"""SVD-LLM compression time of a Llama-7B-shaped model with and without the CUDA extension.

    python benchmarks/bench_compress_7b.py        # runs both variants as subprocesses

Random weights, 4 decoder layers of Llama-7B's shapes, 128 x 2048 calibration tokens, bf16
model, fp32 statistics. The variant without the extension sets SVDKERN_CUDA_EXT=0.
"""
import json
import os
import subprocess
import sys
import time

import torch


def one_run() -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import svdkern

    cfg = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=32, num_hidden_layers=4, vocab_size=32000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    windows = torch.randint(0, 32000, (128, 2048))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    svdkern.compress(model, "svd-llm", 0.2, calib=windows, device="cuda", batch_size=8, progress=False,
                     svd_dtype=torch.float32)
    torch.cuda.synchronize()
    return {"extension": svdkern.has_cuda_ext(), "seconds": time.perf_counter() - t0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(one_run()))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_compress_7b.py needs a CUDA device; none is visible.")
    for ext in ("1", "0"):
        out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True,
                             env={**os.environ, "SVDKERN_CUDA_EXT": ext})
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-2000:])


if __name__ == "__main__":
    main()
