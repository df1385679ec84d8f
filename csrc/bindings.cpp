// CUDA implementations of the svdkern:: ops (schemas and fakes live in svdkern/_ops.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include "svdkern.h"

namespace {

svdkern::InType in_type_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return svdkern::InType::kHalf;
    case at::kBFloat16: return svdkern::InType::kBFloat16;
    case at::kFloat: return svdkern::InType::kFloat;
    default: TORCH_CHECK(false, "svdkern gram ops take fp16, bf16 or fp32 activations; got ", x.scalar_type());
  }
}

void check_acc(const at::Tensor& H, const at::Tensor& X, const char* what) {
  TORCH_CHECK(H.is_cuda() && X.is_cuda(), what, ": tensors must be on a CUDA device");
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1) && H.is_contiguous(), what,
              ": the accumulator must be a contiguous square matrix");
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble, what,
              ": the accumulator must be float32 or float64");
  TORCH_CHECK(X.size(-1) == H.size(1), what, ": X has ", X.size(-1), " channels, accumulator ", H.size(0));
}

void accumulate(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool lower_only) {
  c10::cuda::CUDAGuard guard(C.device());
  auto a = A.reshape({-1, A.size(-1)});
  auto b = B.reshape({-1, B.size(-1)});
  if (a.stride(1) != 1) a = a.contiguous();
  if (b.stride(1) != 1) b = b.contiguous();
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "delta and X must share one dtype");
  auto err = svdkern::launch_gram(a.data_ptr(), b.data_ptr(), C.data_ptr(), a.size(0), (int)a.size(1),
                                  (int)b.size(1), a.stride(0), b.stride(0), C.stride(0), in_type_of(a),
                                  C.scalar_type() == at::kDouble, lower_only,
                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "svdkern gram kernel failed: ", cudaGetErrorString(err));
}

void gram_accumulate_cuda(at::Tensor H, const at::Tensor& X) {
  check_acc(H, X, "gram_accumulate");
  accumulate(H, X, X, /*lower_only=*/true);
}

void cross_accumulate_cuda(at::Tensor D, const at::Tensor& delta, const at::Tensor& X) {
  check_acc(D, X, "cross_accumulate");
  accumulate(D, delta, X, /*lower_only=*/false);
}

std::tuple<at::Tensor, at::Tensor> cholesky_whiten_cuda(const at::Tensor& H_in, double damp_rel,
                                                        double max_damp_rel) {
  c10::cuda::CUDAGuard guard(H_in.device());
  auto H = H_in.to(at::kDouble).contiguous();
  const auto n = H.size(-1);
  auto Hb = H.reshape({-1, n, n});
  const int batch = (int)Hb.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = Hb.options();
  auto scale = at::empty({batch}, opts);
  TORCH_CHECK(svdkern::launch_diag_mean(Hb.data_ptr<double>(), scale.data_ptr<double>(), batch, (int)n,
                                        stream) == cudaSuccess, "diag_mean kernel failed");
  auto damp = at::full({batch}, damp_rel, opts);
  auto active = at::ones({batch}, opts.dtype(at::kInt));
  auto L = at::empty_like(Hb);
  auto work = at::empty_like(Hb);
  while (true) {
    TORCH_CHECK(svdkern::launch_damped_copy(Hb.data_ptr<double>(), work.data_ptr<double>(),
                                            damp.data_ptr<double>(), scale.data_ptr<double>(),
                                            active.data_ptr<int>(), batch, (int)n, stream) == cudaSuccess,
                "damped_copy kernel failed");
    auto [factor, info] = at::linalg_cholesky_ex(work, /*upper=*/false, /*check_errors=*/false);
    auto ok = info.eq(0).logical_and(at::isfinite(factor).flatten(1).all(1));
    auto newly = ok.logical_and(active.to(at::kBool));
    L.index_put_({newly}, factor.index({newly}));
    auto failed = active.to(at::kBool).logical_and(ok.logical_not());
    if (!failed.any().item<bool>()) break;  // the one host sync per damping round
    damp = at::where(failed, at::where(damp.gt(0), damp * 10.0, at::full_like(damp, 1e-12)), damp);
    TORCH_CHECK(!(failed.logical_and(damp.gt(max_damp_rel * (1 + 1e-9)))).any().item<bool>(),
                "svdkern: Gram matrix stays non-positive-definite even with damping ", max_damp_rel,
                " x mean(diag); raise nsamples/seqlen or max damping");
    active = failed.to(at::kInt);
  }
  return {L.reshape(H.sizes()), damp.reshape(H.sizes().slice(0, H.dim() - 2))};
}

}  // namespace

TORCH_LIBRARY_IMPL(svdkern, CUDA, m) {
  m.impl("gram_accumulate", &gram_accumulate_cuda);
  m.impl("cross_accumulate", &cross_accumulate_cuda);
  m.impl("cholesky_whiten", &cholesky_whiten_cuda);
}

// A Python module so that `import svdkern._C` loads the library and runs the registrations.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
