"""Tune the low-rank kernels' tile configs for an architecture and write the shipped table.

    python benchmarks/tune_lowrank.py [--hidden 4096 --intermediate 11008] [--ratios 0.2,0.4,0.6]
                                      [--dry-run] [--out DIR]

For each decoder linear shape of the architecture (q/k/v/o: hidden²; gate/up: hidden→inter;
down: inter→hidden), each ratio, each rank (the default rank_align="auto" one first, then the
papers' rule and rank_align=64's) and each token bucket (1, 4, 16 decode; 64, 512, 2048 prefill),
every candidate config of every regime is timed (do_bench, short repetitions) and the fastest
kept. The table is rewritten after every shape, so a run cut short keeps what it measured. The table goes to
svdkern/backends/configs/lowrank_<GPU name>.json (read at launch: lowrank_configs.py), and a copy
to --out. --dry-run: tiny shapes and two candidates on the CPU (Triton interpreter).
"""
import datetime
import os
import shutil

import torch

from _harness import bench_device, bench_parser, commit
from svdkern.backends import lowrank_configs, triton_lowrank
from svdkern.solvers.rank import aligned_rank, rank_for_ratio

DECODE_BUCKETS = (1, 4, 16)
PREFILL_BUCKETS = (64, 512, 2048)


def shapes(hidden: int, intermediate: int, ratios, align: int):
    """{(m, n, k)} of the architecture's linears at each ratio: the default ("auto") rank first,
    then the papers' rank and the `align`-aligned one (other ranks use the nearest entry)."""
    out = []
    for ratio in ratios:
        for m, n in ((hidden, hidden), (intermediate, hidden), (hidden, intermediate)):
            raw = rank_for_ratio(m, n, ratio)
            for k in (aligned_rank(raw, "auto"), raw, aligned_rank(raw, align)):
                if (m, n, k) not in out:
                    out.append((m, n, k))
    return out


def launches(m, n, k, T, device, dtype):
    """(regime, a, b, c) of each kernel the fused layer runs at T tokens."""
    x = torch.randn(T, n, device=device, dtype=dtype)
    V = torch.randn(k, n, device=device, dtype=dtype)
    U = torch.randn(m, k, device=device, dtype=dtype)
    if T <= triton_lowrank.DECODE_MAX_TOKENS:
        t = torch.zeros(T, k, device=device, dtype=torch.float32)
        return [("shrink", x, V, t), ("expand", t, U, torch.empty(T, m, device=device, dtype=dtype))]
    t = torch.empty(T, k, device=device, dtype=dtype)
    return [("prefill", x, V, t), ("prefill", t, U, torch.empty(T, m, device=device, dtype=dtype))]


def time_config(regime, a, b, c, cfg, dry_run: bool) -> float:
    def call():
        if regime == "shrink":
            c.zero_()  # split-K adds into c
        triton_lowrank._launch(regime, a, b, c, None, 1, config=cfg)

    if dry_run:
        call()
        return float(sum(cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))  # any order will do
    import triton

    try:
        return triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median")
    except Exception as exc:  # e.g. a tile too large for shared memory on this GPU
        if "OutOfResources" in type(exc).__name__ or "out of resource" in str(exc).lower():
            return float("inf")
        raise


def main():
    ap = bench_parser(__doc__)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    args = ap.parse_args()
    device = bench_device(args, __file__)
    dtype = torch.float16 if args.dry_run else torch.bfloat16
    hidden, inter = (48, 80) if args.dry_run else (args.hidden, args.intermediate)
    ratios = [float(r) for r in args.ratios.split(",")]
    buckets = (1, 32) if args.dry_run else DECODE_BUCKETS + PREFILL_BUCKETS
    gpu = torch.cuda.get_device_name() if not args.dry_run else "cpu dry run"
    provenance = {"date": datetime.date.today().isoformat(), "commit": commit(), "torch": torch.__version__,
                  "hidden": hidden, "intermediate": inter, "ratios": ratios}
    path = (lowrank_configs.table_path(gpu) if not args.dry_run
            else os.path.join(args.out or ".", os.path.basename(lowrank_configs.table_path(gpu))))
    table = {regime: {shape: dict(buckets) for shape, buckets in shapes_.items()}  # merge, never lose
             for regime, shapes_ in lowrank_configs.load_table(path).items()}              # earlier entries
    for m, n, k in shapes(hidden, inter, ratios, 8 if args.dry_run else 64):
        for T in buckets:
            for regime, a, b, c in launches(m, n, k, T, device, dtype):
                cands = triton_lowrank.candidates(regime)[: 2 if args.dry_run else None]
                times = [time_config(regime, a, b, c, cfg, args.dry_run) for cfg in cands]
                best = min(range(len(cands)), key=times.__getitem__)
                key = lowrank_configs.shape_key(b.shape[0], a.shape[1], b.dtype)
                table.setdefault(regime, {}).setdefault(key, {})[T] = cands[best]
        # written after every shape: a run stopped by its time limit keeps what it measured
        lowrank_configs.write_table(path, gpu, table, provenance)
        if args.out and os.path.dirname(os.path.abspath(path)) != os.path.abspath(args.out):
            os.makedirs(args.out, exist_ok=True)
            shutil.copy(path, args.out)
        print(f"tuned m={m} n={n} k={k}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
