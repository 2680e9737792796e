// The CUDA implementations of the symmpo_fast ops: argument checks (shared with the CPU ops),
// then the raw-pointer launchers of csrc/cuda/*.cu on the current stream.  Compiled into every
// build but empty unless setup.py found CUDA and defined SYMMPO_FAST_WITH_CUDA.
#ifdef SYMMPO_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/row_ops.cuh"
#include "op_checks.h"

namespace symmpo_fast {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> lse_gather_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                   std::optional<double> softcap, double inv_temp) {
  check_rows(logits_in, labels_in, "lse_gather");
  const float cap = softcap_arg(softcap, inv_temp, "lse_gather");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor logp = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({n}, logits.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::lse_gather(logits.const_data_ptr(), to_dtype(logits.scalar_type()),
                                  labels.const_data_ptr<int64_t>(), n, V, cap, static_cast<float>(inv_temp),
                                  logp.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream()));
  return {logp, lse};
}

void softmax_grad_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
                       const at::Tensor& grad_in, std::optional<double> softcap, double inv_temp, at::Tensor& out) {
  check_rows(logits_in, labels_in, "softmax_grad");
  check_row_vector(lse_in, logits_in, "softmax_grad", "lse");
  check_row_vector(grad_in, logits_in, "softmax_grad", "grad");
  check_softmax_grad_out(out, logits_in);
  const float cap = softcap_arg(softcap, inv_temp, "softmax_grad");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  C10_CUDA_CHECK(cuda::softmax_grad(logits.const_data_ptr(), to_dtype(logits.scalar_type()),
                                    labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                                    grad.const_data_ptr<float>(), logits.size(0), logits.size(1), cap,
                                    static_cast<float>(inv_temp), out.mutable_data_ptr(),
                                    to_dtype(out.scalar_type()), c10::cuda::getCurrentCUDAStream()));
}

at::Tensor segment_sum_cuda(const at::Tensor& values_in, const at::Tensor& segments_in, int64_t num_segments) {
  check_segments(values_in, segments_in, num_segments);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor segments = segments_in.contiguous();
  at::Tensor out = at::empty({num_segments}, values.options());
  C10_CUDA_CHECK(cuda::segment_sum(values.const_data_ptr<float>(), segments.const_data_ptr<int64_t>(),
                                   values.numel(), num_segments, out.mutable_data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> loss_pass_cuda(const at::Tensor& policy_in, const at::Tensor& ref_in, double beta,
                                                  double dpo_weight, double copo_weight, double pair_weight,
                                                  double margin_weight, double anchor_weight, double anchor_delta,
                                                  bool anchor_contrast) {
  const LossParams p = loss_params(policy_in, ref_in, beta, dpo_weight, copo_weight, pair_weight, margin_weight,
                                   anchor_weight, anchor_delta, anchor_contrast);
  const c10::cuda::CUDAGuard guard(policy_in.device());
  const at::Tensor policy = policy_in.contiguous();
  const at::Tensor ref = ref_in.contiguous();
  const int64_t B = policy.size(0);
  at::Tensor terms = at::empty({B, kNumTerms}, policy.options());
  at::Tensor grad = at::empty({B, kNumRoles}, policy.options());
  C10_CUDA_CHECK(cuda::loss_pass(policy.const_data_ptr<float>(), ref.const_data_ptr<float>(), B, p,
                                 terms.mutable_data_ptr<float>(), grad.mutable_data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream()));
  return {terms, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(symmpo_fast, CUDA, m) {
  m.impl("lse_gather", &lse_gather_cuda);
  m.impl("softmax_grad", &softmax_grad_cuda);
  m.impl("segment_sum", &segment_sum_cuda);
  m.impl("loss_pass", &loss_pass_cuda);
}

}  // namespace symmpo_fast

#endif  // SYMMPO_FAST_WITH_CUDA
