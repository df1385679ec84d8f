"""Gram accumulation and whitening: the compiled ops vs PyTorch in the same run (issue 6).

    python benchmarks/bench_stats.py              # writes results/stats_<gpu>.csv

Gram: n ∈ {576, 4096, 11008, 14336}, 64K bf16 tokens in chunks of 2K/8K, vs
`H.addmm_(X.T, X)` in fp32. Whitening: damped Cholesky (+ triangular solve of W P⁻¹) vs
`torch.linalg.cholesky` + explicit inverse, fp64.
"""
import os

import torch

import svdkern
from _harness import header, require_cuda, time_ms, write_csv

SIZES = [576, 4096, 11008, 14336]
TOTAL_TOKENS = 65536


def main():
    require_cuda(__file__)
    if not svdkern.has_cuda_ext():
        from svdkern.backends.cuda_ext import load_error

        raise SystemExit(f"the compiled extension did not load ({load_error()}); build it with "
                         "`pip install --no-build-isolation -e .` on this machine")
    meta = header()
    rows = []
    for n in SIZES:
        for chunk in (2048, 8192):
            X = torch.randn(TOTAL_TOKENS // chunk, chunk, n, device="cuda", dtype=torch.bfloat16)
            H = torch.zeros(n, n, device="cuda")

            def ours(H=H, X=X):
                for x in X:
                    svdkern.gram_accumulate(H, x)

            def baseline(H=H, X=X):
                for x in X:
                    H.addmm_(x.T.float(), x.float())

            t_ours, t_base = time_ms(ours, [()]), time_ms(baseline, [()])
            rows.append({**meta, "op": "gram", "n": n, "chunk": chunk, "ours_ms": round(t_ours, 3),
                         "torch_ms": round(t_base, 3), "speedup": round(t_base / t_ours, 3)})
            print(rows[-1], flush=True)
        A = torch.randn(n + 64, n, device="cuda", dtype=torch.float64)
        Hw = A.T @ A
        W = torch.randn(1024, n, device="cuda", dtype=torch.float64)

        def whiten_ours():
            L, _ = svdkern.cholesky_whiten(Hw)
            return torch.linalg.solve_triangular(L, W, upper=False, left=False)

        def whiten_torch():
            return W @ torch.linalg.inv(torch.linalg.cholesky(Hw))

        t_ours, t_base = time_ms(whiten_ours, [()]), time_ms(whiten_torch, [()])
        rows.append({**meta, "op": "whiten", "n": n, "chunk": 0, "ours_ms": round(t_ours, 3),
                     "torch_ms": round(t_base, 3), "speedup": round(t_base / t_ours, 3)})
        print(rows[-1], flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       f"stats_{meta['gpu'].replace(' ', '_')}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
