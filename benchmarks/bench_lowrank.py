"""Fused low-rank linear vs two unfused matmuls vs dense nn.Linear, bf16, on one GPU (issue 5).

    python benchmarks/bench_lowrank.py            # writes results/lowrank_<gpu>.csv and .md

Shapes (m, n) ∈ {(4096, 4096), (11008, 4096), (4096, 11008)}, ratios 0.2/0.4/0.6 (k from
METHODS.md §0), T ∈ {1, 4, 16, 128, 2048, 8192}. Columns: times (median ms, cold L2), speedups,
fraction of the roofline floor (KERNELS.md §2) and, at decode, achieved bandwidth vs a measured copy.
"""
import os

import torch
import torch.nn.functional as F

from _harness import H100, copy_bandwidth, header, require_cuda, rotating, time_ms, write_csv
from svdkern.backends.triton_lowrank import lowrank_linear
from svdkern.solvers.rank import rank_for_ratio

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
RATIOS = [0.2, 0.4, 0.6]
TOKENS = [1, 4, 16, 128, 2048, 8192]


def floor_s(T, m, n, k):
    bytes_ = 2 * (k * n + m * k + T * n + T * m)
    return max(bytes_ / H100["hbm_bytes_per_s"], 2 * T * k * (m + n) / H100["bf16_flops"]), bytes_


def main():
    require_cuda(__file__)
    meta = header()
    bandwidth = copy_bandwidth()
    rows = []
    for m, n in SHAPES:
        for ratio in RATIOS:
            k = rank_for_ratio(m, n, ratio)
            for T in TOKENS:
                def make():
                    return (torch.randn(T, n, device="cuda", dtype=torch.bfloat16),
                            torch.randn(m, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5,
                            torch.randn(k, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5,
                            torch.randn(m, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5)
                inputs = rotating(make, 2 * (m * n + k * (m + n) + T * (m + n)))
                fused = time_ms(lambda x, U, V, W: lowrank_linear(x, U, V), inputs)
                unfused = time_ms(lambda x, U, V, W: F.linear(F.linear(x, V), U), inputs)
                dense = time_ms(lambda x, U, V, W: F.linear(x, W), inputs)
                floor, bytes_ = floor_s(T, m, n, k)
                rows.append({**meta, "m": m, "n": n, "ratio": ratio, "k": k, "T": T,
                             "fused_ms": round(fused, 5), "unfused_ms": round(unfused, 5),
                             "dense_ms": round(dense, 5), "fused_vs_unfused": round(unfused / fused, 3),
                             "fused_vs_dense": round(dense / fused, 3),
                             "param_bound": round(m * n / (k * (m + n)), 3),
                             "pct_of_floor": round(100 * floor / (fused * 1e-3), 1),
                             "pct_of_copy_bw": round(100 * bytes_ / (fused * 1e-3) / bandwidth, 1)})
                print(rows[-1], flush=True)
    gpu = meta["gpu"].replace(" ", "_")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"lowrank_{gpu}.csv")
    write_csv(out, rows)
    print(f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
