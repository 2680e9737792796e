// Argument checks and conversions shared by the CPU and CUDA implementations of the ops, so
// that both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "loss_math.h"

namespace symmpo_fast {

inline bool is_row_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// logits [n, V] in fp32/bf16/fp16, labels [n] int64 on the same device.
inline void check_rows(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [n, V], got ", logits.sizes());
  TORCH_CHECK(is_row_dtype(logits.scalar_type()), op,
              ": logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [n] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(),
              " but logits on ", logits.device());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits have an empty vocabulary");
}

// A per-row fp32 vector ([n], same device as the logits).
inline void check_row_vector(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name, " must be [n] = [",
              logits.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits on ",
              logits.device());
}

// softcap > 0 or none (encoded as 0 for the kernels), inv_temp > 0.
inline float softcap_arg(const std::optional<double>& softcap, double inv_temp, const char* op) {
  TORCH_CHECK(inv_temp > 0.0, op, ": inv_temp must be > 0, got ", inv_temp);
  if (!softcap.has_value()) return 0.0f;
  TORCH_CHECK(*softcap > 0.0, op, ": softcap must be > 0 or None, got ", *softcap);
  return static_cast<float>(*softcap);
}

inline void check_softmax_grad_out(const at::Tensor& out, const at::Tensor& logits) {
  TORCH_CHECK(out.sizes() == logits.sizes(), "softmax_grad: out must have the logits' shape ",
              logits.sizes(), ", got ", out.sizes());
  TORCH_CHECK(is_row_dtype(out.scalar_type()), "softmax_grad: out must be float32, bfloat16 or float16, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "softmax_grad: out must be contiguous (it is written in place)");
  TORCH_CHECK(out.device() == logits.device(), "softmax_grad: out is on ", out.device(), " but logits on ",
              logits.device());
  // Each tile of a row is read before it is written, so out may be logits itself (the driver
  // writes the gradient over the logits); a partial overlap, e.g. a shifted view of the same
  // buffer, would read values already overwritten.  Non-contiguous logits are copied first.
  if (logits.is_contiguous()) {
    const auto overlap = at::get_overlap_status(out, logits);
    TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                    (overlap == at::MemOverlapStatus::Full && out.scalar_type() == logits.scalar_type()),
                "softmax_grad: out must be logits itself or not overlap it");
  }
}

inline void check_segments(const at::Tensor& values, const at::Tensor& segments, int64_t num_segments) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat,
              "segment_sum: values must be [n] float32, got ", values.sizes(), " ", values.scalar_type());
  TORCH_CHECK(segments.dim() == 1 && segments.size(0) == values.size(0) && segments.scalar_type() == at::kLong,
              "segment_sum: segments must be [n] int64 like values, got ", segments.sizes(), " ",
              segments.scalar_type());
  TORCH_CHECK(segments.device() == values.device(), "segment_sum: segments are on ", segments.device(),
              " but values on ", values.device());
  TORCH_CHECK(num_segments >= 0, "segment_sum: num_segments must be >= 0, got ", num_segments);
}

// Checks the loss pass's inputs and packs ObjectiveConfig's fields for the kernels.
inline LossParams loss_params(const at::Tensor& policy, const at::Tensor& ref, double beta, double dpo_weight,
                              double copo_weight, double pair_weight, double margin_weight, double anchor_weight,
                              double anchor_delta, bool anchor_contrast) {
  TORCH_CHECK(policy.dim() == 2 && policy.size(1) == kNumRoles && policy.scalar_type() == at::kFloat,
              "loss_pass: policy must be [B, 5] float32, got ", policy.sizes(), " ", policy.scalar_type());
  TORCH_CHECK(ref.sizes() == policy.sizes() && ref.scalar_type() == at::kFloat,
              "loss_pass: ref must be [B, 5] float32 like policy, got ", ref.sizes(), " ", ref.scalar_type());
  TORCH_CHECK(ref.device() == policy.device(), "loss_pass: ref is on ", ref.device(), " but policy on ",
              policy.device());
  TORCH_CHECK(beta > 0.0, "loss_pass: beta must be > 0, got ", beta);
  auto f = [](double v) { return static_cast<float>(v); };
  return {f(beta),          f(dpo_weight),    f(copo_weight),  f(pair_weight),
          f(margin_weight), f(anchor_weight), f(anchor_delta), anchor_contrast};
}

}  // namespace symmpo_fast
