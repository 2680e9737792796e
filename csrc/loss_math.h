// The per-record preference loss and its gradient in closed form, shared by the CPU op
// (cpu_ops.cpp) and the CUDA kernel (cuda/seq_ops.cu): one copy of the math, so the two cannot
// drift apart.  Plain C++ with no torch headers, so that nvcc compiles it alone.
//
// With lr_k = policy_k - ref_k and r_k = beta * lr_k (objectives.py has the paper's notation):
//   dpo    = -logsig(r0 - r1)              copo   = -logsig(r0 - r3)
//   pair   = -logsig(r0 - r2) - logsig(r4 - r3)
//   margin = ((lr0 - lr2) - (lr4 - lr3))^2
//   anchor = -logsig(r0 - delta) [- logsig(r4 - delta) if anchor_contrast]
// and d(-logsig(a - b))/da = -sigmoid(b - a).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SF_HOST_DEVICE inline
#endif

namespace symmpo_fast {

constexpr int kNumRoles = 5;  // objectives.ROLES: chosen, rejected, pair_rejected, contrast_rejected, contrast_chosen
constexpr int kNumTerms = 5;  // objectives.TERMS: dpo, copo, pair, margin, anchor

// ObjectiveConfig's fields, as scalars so that the struct crosses into a CUDA kernel by value.
struct LossParams {
  float beta;
  float dpo_weight, copo_weight, pair_weight, margin_weight, anchor_weight;
  float anchor_delta;
  bool anchor_contrast;
};

// logsig(x) = min(x, 0) - log1p(exp(-|x|)): no overflow for either sign (as F.logsigmoid).
SF_HOST_DEVICE float log_sigmoid(float x) {
  return fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
}

SF_HOST_DEVICE float sigmoid(float x) {
  const float e = expf(-fabsf(x));  // in (0, 1]: never overflows
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// One record: terms[kNumTerms] (unweighted) and grad[kNumRoles] = d(sum_t w_t * terms_t)/d policy.
// Each term reads only its own columns, so NaN in a column no weighted term uses never leaks
// into the outputs (the driver does not compute those columns).
SF_HOST_DEVICE void loss_record(const float* policy, const float* ref, const LossParams& p,
                                float* terms, float* grad) {
  for (int k = 0; k < kNumRoles; ++k) grad[k] = 0.0f;
  for (int t = 0; t < kNumTerms; ++t) terms[t] = 0.0f;
  // r_k rounded as the reference computes it (beta * lr_k, then the difference).
  auto lr = [&](int k) { return policy[k] - ref[k]; };
  auto r = [&](int k) { return p.beta * lr(k); };
  // -logsig(a - b) into terms[t] with weight w, and its gradient into columns ia and ib.
  auto preference = [&](int t, float w, int ia, float a, int ib, float b) {
    const float d = a - b;
    terms[t] -= log_sigmoid(d);
    const float g = w * p.beta * sigmoid(-d);
    grad[ia] -= g;
    if (ib >= 0) grad[ib] += g;
  };
  constexpr int kNone = -1;  // the anchor compares with the constant delta, not with a column
  if (p.dpo_weight != 0.0f) preference(0, p.dpo_weight, 0, r(0), 1, r(1));
  if (p.copo_weight != 0.0f) preference(1, p.copo_weight, 0, r(0), 3, r(3));
  if (p.pair_weight != 0.0f) {
    preference(2, p.pair_weight, 0, r(0), 2, r(2));
    preference(2, p.pair_weight, 4, r(4), 3, r(3));
  }
  if (p.margin_weight != 0.0f) {
    const float u = (lr(0) - lr(2)) - (lr(4) - lr(3));
    terms[3] = u * u;
    const float g = 2.0f * p.margin_weight * u;
    grad[0] += g;
    grad[2] -= g;
    grad[4] -= g;
    grad[3] += g;
  }
  if (p.anchor_weight != 0.0f) {
    preference(4, p.anchor_weight, 0, r(0), kNone, p.anchor_delta);
    if (p.anchor_contrast) preference(4, p.anchor_weight, 4, r(4), kNone, p.anchor_delta);
  }
}

}  // namespace symmpo_fast
