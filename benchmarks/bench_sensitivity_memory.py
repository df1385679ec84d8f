"""Peak host memory of the sensitivity pass (`best`'s Fisher measurement) at a 262k vocabulary.

The head's loss and gradient run in token chunks (svdkern/head.py); this measures that against
the whole micro-batch's logits at once (CHUNK_BYTES unbounded, what the pass did before), on a
two-layer Llama with Gemma3's vocabulary, 8 windows of 512 tokens, each way in a fresh process.

    python benchmarks/bench_sensitivity_memory.py      # writes results/sensitivity_memory.md
"""
import os
import subprocess
import sys
import time

from _common import RESULTS, provenance

VOCAB, WINDOWS, SEQLEN = 262144, 8, 512


def measure(mode: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import svdkern.head as head
    from svdkern.host import peak_rss, proc_bytes, reset_peak_rss
    from svdkern.layer_store import LayerStore
    from svdkern.models import architecture_of
    from svdkern.sensitivity import output_fisher

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                               max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, VOCAB, (WINDOWS, SEQLEN))
    arch = architecture_of(model)
    if mode == "whole":
        head.CHUNK_BYTES = 1 << 50
    base = proc_bytes("/proc/self/status", "VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    with torch.no_grad():
        output_fisher(model, LayerStore(model.get_submodule(arch.layers_path), "cpu", "cpu"), arch, ids, WINDOWS,
                      "cpu", "cpu", False)
    return f"{(peak_rss() - base) / 2**30:.2f} {time.perf_counter() - started:.1f}"


def main():
    if len(sys.argv) > 1:
        print(measure(sys.argv[1]))
        return
    rows = {}
    for mode in ("chunked", "whole"):
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, check=True)
        rows[mode] = out.stdout.split()[-2:]
    lines = ["# Sensitivity pass: peak host memory at a 262k vocabulary", "",
             f"Written by `python benchmarks/bench_sensitivity_memory.py` ({provenance()}). A two-layer Llama",
             f"(hidden 64) with Gemma3's vocabulary ({VOCAB:,}), one micro-batch of {WINDOWS} windows x {SEQLEN}",
             "tokens, peak RSS above the process's size before the pass, each mode in a fresh process.", "",
             "| head | peak above start (GiB) | seconds |", "|---|---|---|",
             f"| in token chunks (svdkern/head.py, the default) | {rows['chunked'][0]} | {rows['chunked'][1]} |",
             f"| the micro-batch's full logits at once (before) | {rows['whole'][0]} | {rows['whole'][1]} |"]
    with open(os.path.join(RESULTS, "sensitivity_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
