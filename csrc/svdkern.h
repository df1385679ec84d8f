// svdkern CUDA kernels: raw pointers + stream, no torch types (bindings.cpp adapts them).
#pragma once
#include <cuda_runtime.h>

namespace svdkern {

enum class InType { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// C (na x nb, row-major, ldc) += Aᵀ B for A (tokens x na, lda) and B (tokens x nb, ldb).
// lower_only: skip output tiles strictly above the diagonal (Gram: A == B, read mirrored).
// Half/bf16 inputs use tensor cores (WMMA, fp32 accumulation); fp32 inputs use fp32 FMA.
// acc_double: C is double (the fp32 tile sums are added in double), else float.
cudaError_t launch_gram(const void* A, const void* B, void* C, long tokens, int na, int nb,
                        long lda, long ldb, long ldc, InType in_type, bool acc_double,
                        bool lower_only, cudaStream_t stream);

// mean(diag(H_b)) for each of `batch` n x n double matrices.
cudaError_t launch_diag_mean(const double* H, double* mean, int batch, int n, cudaStream_t stream);

// out_b = H_b + damp_b * scale_b * I for the members with active_b != 0 (others untouched).
cudaError_t launch_damped_copy(const double* H, double* out, const double* damp, const double* scale,
                               const int* active, int batch, int n, cudaStream_t stream);

}  // namespace svdkern
