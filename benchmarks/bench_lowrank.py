"""Fused low-rank linear vs two unfused matmuls vs dense nn.Linear, bf16, one GPU (issue 10).

    python benchmarks/bench_lowrank.py [--ratios 0.4] [--tokens 1,16,2048] [--name lowrank]
                                       [--dry-run] [--out DIR]

LLaMA-7B shapes (m, n) ∈ {(4096, 4096), (11008, 4096), (4096, 11008)} at ratios 0.2/0.4/0.6, with
the rank the papers' rule gives ("raw", never a multiple of 8) and that rank rounded down to a
multiple of 64 ("aligned 64", as rank_align=64 builds it), T ∈ {1, 4, 16, 64, 512, 2048};
--ratios and --tokens pick a subset (the GPU suite first runs 0.4 at T = 1, 16, 2048).
Columns: eager median ms (cold L2 over rotating copies) and CUDA-graph replay ms per call (launch
overhead gone) for the fused kernel, two F.linear calls and the dense layer; the fused path's
two kernels timed alone (shrink, expand); % of the HBM floor and of the bf16 tensor-core floor.
Each row is appended to results/<name>_<GPU>.csv and .md as it is measured. --dry-run: tiny
shapes on the CPU (Triton interpreter), so the script cannot rot between GPU sessions.
"""
import torch
import torch.nn.functional as F

from _harness import H100, Rows, bench_device, bench_parser, graph_ms, header, rotating, time_ms
from svdkern.backends import triton_lowrank
from svdkern.solvers.rank import aligned_rank, rank_for_ratio

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
RATIOS = [0.2, 0.4, 0.6]
TOKENS = [1, 4, 16, 64, 512, 2048]


def floors_s(T, m, n, k):
    """(HBM floor, tensor-core floor, bytes moved) of one fused call (KERNELS.md §2)."""
    bytes_ = 2 * (k * n + m * k + T * n + T * m)
    return bytes_ / H100["hbm_bytes_per_s"], 2 * T * k * (m + n) / H100["bf16_flops"], bytes_


def kernels(x, U, V):
    """The fused path's two launches with their outputs preallocated: (shrink, expand) closures."""
    T, k = x.shape[0], U.shape[1]
    if T <= triton_lowrank.DECODE_MAX_TOKENS:
        t = torch.zeros(T, k, device=x.device, dtype=torch.float32)
        y = torch.empty(T, U.shape[0], device=x.device, dtype=x.dtype)
        return (lambda: triton_lowrank._launch("shrink", x, V, t, None, 3),
                lambda: triton_lowrank._launch("expand", t, U, y, None, 1))
    t = torch.empty(T, k, device=x.device, dtype=x.dtype)
    y = torch.empty(T, U.shape[0], device=x.device, dtype=x.dtype)
    return (lambda: triton_lowrank._launch("prefill", x, V, t, None, 1),
            lambda: triton_lowrank._launch("prefill", t, U, y, None, 1))


def main():
    ap = bench_parser(__doc__)
    ap.add_argument("--ratios", default=None, help="comma-separated (default 0.2,0.4,0.6; dry run 0.4)")
    ap.add_argument("--tokens", default=None, help="comma-separated T (default all six; dry run 1,20)")
    ap.add_argument("--name", default="lowrank", help="stem of the result files")
    args = ap.parse_args()
    device = bench_device(args, __file__)
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter has no bf16
    shapes = [(96, 80)] if args.dry_run else SHAPES
    ratios = parse_list(args.ratios, float, [0.4] if args.dry_run else RATIOS)
    tokens = parse_list(args.tokens, int, [1, 20] if args.dry_run else TOKENS)
    meta = header()
    rows = Rows(args.out, args.name, meta, "Fused low-rank linear vs unfused vs dense (bf16)",
                "ms are medians; graph = CUDA-graph replay per call; % floor = HBM floor / "
                "fused eager time; x_dense = dense / fused (eager and graph).")
    for m, n in shapes:
        for ratio in ratios:
            raw = rank_for_ratio(m, n, ratio)
            for variant, k in (("raw", raw), ("aligned 64", aligned_rank(raw, 64 if not args.dry_run else 8))):
                for T in tokens:
                    rows.add(measure(meta, device, dtype, m, n, ratio, variant, k, T))
    print(f"wrote {rows.csv} and .md")


def parse_list(text: str | None, kind, default: list) -> list:
    return default if text is None else [kind(v) for v in text.split(",")]


def measure(meta, device, dtype, m, n, ratio, variant, k, T):
    def make():
        return (torch.randn(T, n, device=device, dtype=dtype),
                torch.randn(m, k, device=device, dtype=dtype) / k ** 0.5,
                torch.randn(k, n, device=device, dtype=dtype) / n ** 0.5,
                torch.randn(m, n, device=device, dtype=dtype) / n ** 0.5)

    inputs = rotating(make, 2 * (m * n + k * (m + n) + T * (m + n)), cap=64 if device == "cuda" else 2)
    fused = lambda x, U, V, W: triton_lowrank.lowrank_linear(x, U, V)  # noqa: E731
    unfused = lambda x, U, V, W: F.linear(F.linear(x, V), U)  # noqa: E731
    dense = lambda x, U, V, W: F.linear(x, W)  # noqa: E731
    eager = {name: time_ms(fn, inputs) for name, fn in (("fused", fused), ("unfused", unfused), ("dense", dense))}
    graph = {name: graph_ms(fn, inputs) for name, fn in (("fused", fused), ("unfused", unfused), ("dense", dense))}
    shrink, expand = kernels(*inputs[0][:3])
    alone = {name: time_ms(lambda _x, fn=fn: fn(), [(inputs[0][0],)]) for name, fn in (("shrink", shrink), ("expand", expand))}
    hbm, tc, _ = floors_s(T, m, n, k)
    r = lambda v: None if v is None else round(v, 5)  # noqa: E731
    return {**meta, "m": m, "n": n, "ratio": ratio, "rank": variant, "k": k, "T": T,
            "fused_ms": r(eager["fused"]), "unfused_ms": r(eager["unfused"]), "dense_ms": r(eager["dense"]),
            "fused_graph_ms": r(graph["fused"]), "unfused_graph_ms": r(graph["unfused"]),
            "dense_graph_ms": r(graph["dense"]),
            "shrink_ms": r(alone["shrink"]), "expand_ms": r(alone["expand"]),
            "x_dense": round(eager["dense"] / eager["fused"], 3),
            "x_dense_graph": None if graph["fused"] is None else round(graph["dense"] / graph["fused"], 3),
            "x_unfused": round(eager["unfused"] / eager["fused"], 3),
            "param_bound": round(m * n / (k * (m + n)), 3),
            "pct_hbm_floor": round(100 * hbm / (eager["fused"] * 1e-3), 1),
            "pct_tc_floor": round(100 * tc / (eager["fused"] * 1e-3), 1)}


if __name__ == "__main__":
    main()
