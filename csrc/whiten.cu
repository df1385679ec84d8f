// Helpers for batched damped Cholesky (KERNELS.md §5): the per-member diagonal scale and the
// damped copy of only the members that still need a factorization. The factorization itself is
// cuSOLVER's (through ATen's linalg_cholesky_ex) in bindings.cpp.
#include "svdkern.h"

namespace svdkern {
namespace {

__global__ void diag_mean_kernel(const double* __restrict__ H, double* __restrict__ mean, int n) {
  const double* Hb = H + (long)blockIdx.x * n * n;
  double sum = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += Hb[(long)i * n + i];
  __shared__ double partial[256];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) mean[blockIdx.x] = fmax(partial[0] / n, 2.2250738585072014e-308);
}

__global__ void damped_copy_kernel(const double* __restrict__ H, double* __restrict__ out,
                                   const double* __restrict__ damp, const double* __restrict__ scale,
                                   const int* __restrict__ active, int n) {
  const int b = blockIdx.y;
  if (!active[b]) return;
  const long nn = (long)n * n;
  const double shift = damp[b] * scale[b];
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < nn; i += (long)gridDim.x * blockDim.x) {
    const long r = i / n, c = i % n;
    out[b * nn + i] = H[b * nn + i] + (r == c ? shift : 0.0);
  }
}

}  // namespace

cudaError_t launch_diag_mean(const double* H, double* mean, int batch, int n, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  diag_mean_kernel<<<batch, 256, 0, stream>>>(H, mean, n);
  return cudaGetLastError();
}

cudaError_t launch_damped_copy(const double* H, double* out, const double* damp, const double* scale,
                               const int* active, int batch, int n, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  long nn = (long)n * n;
  int blocks = (int)((nn + 255) / 256 < 1024 ? (nn + 255) / 256 : 1024);
  damped_copy_kernel<<<dim3(blocks, batch), 256, 0, stream>>>(H, out, damp, scale, active, n);
  return cudaGetLastError();
}

}  // namespace svdkern
