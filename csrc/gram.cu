// Gram accumulation H += XᵀX (lower tiles only) and the cross term D += δᵀX (KERNELS.md §4).
//
// One 64x64 output tile per block, 4 warps of 32x32 (2x2 WMMA 16x16x16 fragments). Token
// chunks of 32 are staged through shared memory with zero fill, so any n, token count and
// stride work (WMMA needs aligned, padded tiles). The fp32 path keeps the same tiling with a
// 4x4 register block per thread and exact fp32 FMAs (no TF32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "svdkern.h"

namespace svdkern {
namespace {

constexpr int kTile = 64;
constexpr int kChunk = 32;
constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ T zero_value() { return T(0.0f); }

template <typename T>
__device__ void stage(const T* __restrict__ src, T (*dst)[kTile + 8], long t0, long tokens, int c0,
                      int ncols, long ld) {
  // dst[t][c] = src[(t0 + t) * ld + c0 + c], zero outside the matrix.
  for (int i = threadIdx.x; i < kChunk * kTile; i += kThreads) {
    int t = i / kTile, c = i % kTile;
    long row = t0 + t;
    int col = c0 + c;
    dst[t][c] = (row < tokens && col < ncols) ? src[row * ld + col] : zero_value<T>();
  }
}

template <typename OutT>
__device__ void add_tile(const float (*tile)[kTile + 4], OutT* C, int r0, int c0, int na, int nb, long ldc) {
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    int r = i / kTile, c = i % kTile;
    if (r0 + r < na && c0 + c < nb) C[(long)(r0 + r) * ldc + c0 + c] += static_cast<OutT>(tile[r][c]);
  }
}

__device__ __forceinline__ bool skip_tile(bool lower_only) {
  return lower_only && blockIdx.x > blockIdx.y;  // x: column tile, y: row tile
}

template <typename T, typename OutT>
__global__ void gram_wmma_kernel(const T* __restrict__ A, const T* __restrict__ B, OutT* C, long tokens,
                                 int na, int nb, long lda, long ldb, long ldc, bool lower_only) {
  using namespace nvcuda;
  if (skip_tile(lower_only)) return;
  __shared__ __align__(32) T sA[kChunk][kTile + 8];
  __shared__ __align__(32) T sB[kChunk][kTile + 8];
  __shared__ __align__(32) float sC[kTile][kTile + 4];
  const int r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (long t0 = 0; t0 < tokens; t0 += kChunk) {
    stage(A, sA, t0, tokens, r0, na, lda);
    stage(B, sB, t0, tokens, c0, nb, ldb);
    __syncthreads();
    for (int k = 0; k < kChunk; k += 16) {
      // (Aᵀ)[r, t] = sA[t][r]: column-major with leading dimension kTile + 8.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sA[k][wr + 16 * i], kTile + 8);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sB[k][wc + 16 * j], kTile + 8);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sC[wr + 16 * i][wc + 16 * j], acc[i][j], kTile + 4, wmma::mem_row_major);
  __syncthreads();
  add_tile(sC, C, r0, c0, na, nb, ldc);
}

template <typename OutT>
__global__ void gram_fp32_kernel(const float* __restrict__ A, const float* __restrict__ B, OutT* C,
                                 long tokens, int na, int nb, long lda, long ldb, long ldc, bool lower_only) {
  if (skip_tile(lower_only)) return;
  __shared__ float sA[kChunk][kTile + 8];
  __shared__ float sB[kChunk][kTile + 8];
  __shared__ float sC[kTile][kTile + 4];
  const int r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  // 128 threads x (8 rows x 4 cols) = 64 x 64 outputs.
  const int tr = (threadIdx.x / 16) * 8, tc = (threadIdx.x % 16) * 4;
  float acc[8][4] = {};
  for (long t0 = 0; t0 < tokens; t0 += kChunk) {
    stage(A, sA, t0, tokens, r0, na, lda);
    stage(B, sB, t0, tokens, c0, nb, ldb);
    __syncthreads();
    for (int t = 0; t < kChunk; ++t) {
      float a[8], b[4];
      for (int i = 0; i < 8; ++i) a[i] = sA[t][tr + i];
      for (int j = 0; j < 4; ++j) b[j] = sB[t][tc + j];
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j) sC[tr + i][tc + j] = acc[i][j];
  __syncthreads();
  add_tile(sC, C, r0, c0, na, nb, ldc);
}

template <typename OutT>
cudaError_t dispatch_in(const void* A, const void* B, OutT* C, long tokens, int na, int nb, long lda,
                        long ldb, long ldc, InType in_type, bool lower_only, cudaStream_t stream) {
  dim3 grid((nb + kTile - 1) / kTile, (na + kTile - 1) / kTile);
  switch (in_type) {
    case InType::kHalf:
      gram_wmma_kernel<__half, OutT><<<grid, kThreads, 0, stream>>>(
          static_cast<const __half*>(A), static_cast<const __half*>(B), C, tokens, na, nb, lda, ldb, ldc, lower_only);
      break;
    case InType::kBFloat16:
      gram_wmma_kernel<__nv_bfloat16, OutT><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), C, tokens, na, nb, lda,
          ldb, ldc, lower_only);
      break;
    case InType::kFloat:
      gram_fp32_kernel<OutT><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(A), static_cast<const float*>(B), C, tokens, na, nb, lda, ldb, ldc, lower_only);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gram(const void* A, const void* B, void* C, long tokens, int na, int nb, long lda,
                        long ldb, long ldc, InType in_type, bool acc_double, bool lower_only,
                        cudaStream_t stream) {
  if (tokens == 0 || na == 0 || nb == 0) return cudaSuccess;
  if (acc_double)
    return dispatch_in(A, B, static_cast<double*>(C), tokens, na, nb, lda, ldb, ldc, in_type, lower_only, stream);
  return dispatch_in(A, B, static_cast<float*>(C), tokens, na, nb, lda, ldb, ldc, in_type, lower_only, stream);
}

}  // namespace svdkern
