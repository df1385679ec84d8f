"""Gram accumulation and whitening: every CUDA path against strong baselines, one run (issue 10).

    python benchmarks/bench_stats.py [--dry-run] [--out DIR]

Gram H += XᵀX, n ∈ {576, 4096, 11008}, 32K bf16 tokens in chunks of 2K/8K, fp32 accumulator:
- ext: the compiled extension's hand WMMA kernel (lower triangle), when it is built;
- blocked (svdkern's default, SVDKERN_GRAM=blas): lower-triangle panels of cuBLAS, bf16 products
  with fp32 output (`mm(out_dtype=float32)`: exact products, tensor-core rate);
- addmm fp32: the full XᵀX from X cast to fp32, TF32 off;
- addmm tf32: the same with TF32 on (lossless here: bf16 inputs fit TF32's mantissa);
- mm bf16→fp32: the full product with fp32 output.
Each row gives ms, TFLOP/s counted on the full n²·T product, and the max error against fp64.
Whitening: damped Cholesky + triangular solve vs `cholesky` + explicit inverse, fp64.
Each row is appended to results/stats_<GPU>.csv and .md as it is measured.
--dry-run: tiny shapes on the CPU (the paths a CPU lacks are skipped) so the script cannot rot.
"""
import torch

import svdkern
from _harness import Rows, bench_device, bench_parser, header, time_ms
from svdkern.backends import torch_ops
from svdkern.solvers.whiten import symmetrize

SIZES = [576, 4096, 11008]
TOTAL_TOKENS = 32768


class _tf32:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def gram_paths(device):
    def ext(H, x):
        torch.ops.svdkern.gram_accumulate(H, x)

    def blocked(H, x):
        torch_ops.gram_accumulate(H, x)

    def addmm_fp32(H, x):
        with _tf32(False):
            H.addmm_(x.T.float(), x.float())

    def addmm_tf32(H, x):
        with _tf32(True):
            H.addmm_(x.T.float(), x.float())

    def mm_out_fp32(H, x):
        H += torch.mm(x.T, x, out_dtype=torch.float32)

    paths = {"blocked": blocked, "addmm fp32": addmm_fp32, "addmm tf32": addmm_tf32}
    if device == "cuda":
        paths["mm bf16->fp32"] = mm_out_fp32
        if svdkern.has_cuda_ext():
            paths["ext"] = ext
    return paths


def main():
    args = bench_parser(__doc__).parse_args()
    device = bench_device(args, __file__)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    sizes, total, chunks = (SIZES, TOTAL_TOKENS, (2048, 8192)) if not args.dry_run else ([33, 70], 256, (64,))
    meta = header()
    rows = Rows(args.out, "stats", meta, "Gram accumulation and whitening paths",
                f"Gram over {total} tokens per row; rel_err = max |H − H_fp64| / max |H_fp64|.")
    for n in sizes:
        for chunk in chunks:
            X = torch.randn(total // chunk, chunk, n, device=device, dtype=dtype)
            ref = sum(x.double().T @ x.double() for x in X)
            for name, fn in gram_paths(device).items():
                H = torch.zeros(n, n, device=device)
                for x in X:
                    fn(H, x)
                full = symmetrize(H) if name in ("ext", "blocked") else H
                err = float((full.double() - ref).abs().max() / ref.abs().max())

                def run(H=H, fn=fn):
                    for x in X:
                        fn(H, x)

                ms = time_ms(lambda H: run(H), [(H,)])
                rows.add({**meta, "op": "gram", "path": name, "n": n, "chunk": chunk, "ms": round(ms, 3),
                          "tflops": round(2 * total * n * n / (ms * 1e-3) / 1e12, 1),
                          "rel_err": f"{err:.1e}"})
        A = torch.randn(n + 64, n, device=device, dtype=torch.float64)
        Hw = A.T @ A
        W = torch.randn(1024 if not args.dry_run else 16, n, device=device, dtype=torch.float64)

        def whiten_ours(Hw):
            L, _ = svdkern.cholesky_whiten(Hw)
            return torch.linalg.solve_triangular(L, W, upper=False, left=False)

        def whiten_inverse(Hw):
            return W @ torch.linalg.inv(torch.linalg.cholesky(Hw))

        for name, fn in (("cholesky + solve", whiten_ours), ("cholesky + inverse", whiten_inverse)):
            ms = time_ms(fn, [(Hw,)])
            rows.add({**meta, "op": "whiten", "path": name, "n": n, "chunk": None, "ms": round(ms, 3),
                      "tflops": None, "rel_err": None})
    print(f"wrote {rows.csv} and .md")


if __name__ == "__main__":
    main()
