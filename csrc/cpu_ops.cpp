// CPU implementations of the four row ops (schemas in ops.cpp; the executable spec is
// symmpo_fast/_ops_torch.py).
//
// A row of logits is walked in tiles of kTile values: each tile is upcast to fp32 (and put
// through temperature and softcap) into a buffer that stays in L1, then the vector loops run
// over the buffer.  The log-sum-exp is online across tiles (rescale the running sum when a tile
// raises the running max), so a row is read once whatever V is, with one exp per value.
//
// The tile loops are `#pragma omp simd` loops over the branch-free helpers of cpu_math.h, built
// twice (x86-64-v3, i.e. AVX2 + FMA + F16C, and the baseline) and picked at load time by the
// CPU's features, so one binary runs anywhere and is fast on the machines people use.  Trap:
// they vectorise only with -fno-trapping-math (setup.py passes it); without it GCC keeps the
// selects as branches.  Rows are shared among OpenMP threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "loss_math.h"
#include "op_checks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SF_MULTIVERSION
#endif

namespace symmpo_fast {
namespace {

constexpr int64_t kTile = 1024;  // fp32 values per tile: 4 KiB, in L1 with room to spare
// Below this many values a parallel region costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// z = softcap * tanh(x * inv_temp / softcap), or x * inv_temp; softcap 0 means none.
struct Transform {
  float inv_temp;
  float softcap;
  float inv_softcap;
  bool identity() const { return inv_temp == 1.0f && softcap == 0.0f; }
};

Transform make_transform(float softcap, double inv_temp) {
  const float it = static_cast<float>(inv_temp);
  return {it, softcap, softcap > 0.0f ? 1.0f / softcap : 0.0f};
}

SF_INLINE float softcapped(float x, const Transform& tf) {
  return tf.softcap * sf_tanh(x * tf.inv_temp * tf.inv_softcap);
}

// dz/dx under the softcap, from z: tanh' = 1 - tanh^2, and tanh(.) = z / softcap.
SF_INLINE float softcap_slope(float z, const Transform& tf) {
  return (1.0f - z * tf.inv_softcap * (z * tf.inv_softcap)) * tf.inv_temp;
}

// ---- tile primitives: the only code whose speed matters; each is built per instruction set ----

SF_INLINE float apply_transform(float x, const Transform& tf) {
  return tf.softcap > 0.0f ? softcapped(x, tf) : x * tf.inv_temp;
}

SF_INLINE float to_f32(float v) { return v; }
SF_INLINE float to_f32(c10::BFloat16 v) { return bf16_to_f32(v.x); }
SF_INLINE float to_f32(c10::Half v) { return f16_to_f32(v.x); }

// Upcast and transform one tile into z.  The softcap test is hoisted out of the loop by hand:
// a select inside would make every value pay for the tanh.  Trap: every helper a tile
// primitive calls must be inlined into it (SF_INLINE); one left out of line is compiled for
// the baseline instruction set only, and its loop no longer vectorises.
template <typename T>
SF_INLINE void load_tile_impl(const T* x, int64_t len, const Transform& tf, float* z) {
  if (tf.softcap > 0.0f) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) z[i] = softcapped(to_f32(x[i]), tf);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) z[i] = to_f32(x[i]) * tf.inv_temp;
  }
}

SF_MULTIVERSION void load_tile(const float* x, int64_t len, Transform tf, float* z) { load_tile_impl(x, len, tf, z); }
SF_MULTIVERSION void load_tile(const c10::BFloat16* x, int64_t len, Transform tf, float* z) {
  load_tile_impl(x, len, tf, z);
}
SF_MULTIVERSION void load_tile(const c10::Half* x, int64_t len, Transform tf, float* z) {
  load_tile_impl(x, len, tf, z);
}

SF_MULTIVERSION void store_tile(const float* d, int64_t len, c10::BFloat16* out) {
  auto* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) o[i] = f32_to_bf16(d[i]);
}
SF_MULTIVERSION void store_tile(const float* d, int64_t len, c10::Half* out) {
  auto* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) o[i] = f32_to_f16(d[i]);
}

SF_MULTIVERSION float tile_max(const float* z, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < len; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

SF_MULTIVERSION float tile_sum_exp(const float* z, int64_t len, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += sf_exp(z[i] - shift);
  return s;
}

// d[i] = (onehot_i - exp(z_i - lse)) * g * dz_i/dx_i, with label as a tile-local index (may lie
// outside the tile).  d may be z itself: each value is read before it is written, and the
// label's z is read before the loop.  The one-hot is a fix-up after the loop, not a compare
// inside: an int64 compare per value would halve the vector width.
SF_MULTIVERSION void tile_grad(const float* z, int64_t len, int64_t label, float lse, float g, Transform tf,
                               float* d) {
  const bool here = label >= 0 && label < len;
  const float z_label = here ? z[label] : 0.0f;
  if (tf.softcap > 0.0f) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) d[i] = -g * sf_exp(z[i] - lse) * softcap_slope(z[i], tf);
  } else {
    const float scale = -g * tf.inv_temp;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) d[i] = sf_exp(z[i] - lse) * scale;
  }
  if (here) {
    const float slope = tf.softcap > 0.0f ? softcap_slope(z_label, tf) : tf.inv_temp;
    d[label] = (g - g * sf_exp(z_label - lse)) * slope;
  }
}

// ---- rows ----

// The fp32 values of one tile: the logits themselves when nothing needs converting, else buf.
template <typename T>
inline const float* tile_values(const T* x, int64_t len, const Transform& tf, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (tf.identity()) return x;
  }
  load_tile(x, len, tf, buf);
  return buf;
}

// num_threads(at::get_num_threads()): torch.set_num_threads governs these loops too, also in
// torch builds whose own thread pool is not OpenMP's.
template <typename T>
void lse_gather_rows(const T* logits, const int64_t* labels, int64_t n, int64_t V, Transform tf, float* logp,
                     float* lse) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (n * V >= kParallelGrain)
  for (int64_t row = 0; row < n; ++row) {
    alignas(64) float buf[kTile];
    const T* x = logits + row * V;  // int64 offsets: n * V overflows int32 at large vocabularies
    float m = -std::numeric_limits<float>::infinity();
    float s = 0.0f;
    for (int64_t j = 0; j < V; j += kTile) {
      const int64_t len = std::min(kTile, V - j);
      const float* z = tile_values(x + j, len, tf, buf);
      const float tm = tile_max(z, len);
      if (tm == -std::numeric_limits<float>::infinity()) continue;  // nothing to add; avoids inf - inf
      if (tm > m) {
        s *= std::exp(m - tm);
        m = tm;
      }
      s += tile_sum_exp(z, len, m);
    }
    const float row_lse = m + std::log(s);
    lse[row] = row_lse;
    const int64_t label = labels[row];
    // label >= V: the row's label lies in another vocabulary tile (see check_labels_cpu).
    logp[row] = label < 0 || label >= V ? 0.0f : apply_transform(to_f32(x[label]), tf) - row_lse;
  }
}

template <typename T, typename O>
void softmax_grad_rows(const T* logits, const int64_t* labels, const float* lse, const float* grad, int64_t n,
                       int64_t V, Transform tf, O* out) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (n * V >= kParallelGrain)
  for (int64_t row = 0; row < n; ++row) {
    alignas(64) float buf[kTile];
    const T* x = logits + row * V;
    O* o = out + row * V;
    const int64_t label = labels[row];
    if (label < 0) {  // a skipped row has no gradient, whatever its lse holds
      std::fill(o, o + V, O(0.0f));
      continue;
    }
    for (int64_t j = 0; j < V; j += kTile) {
      const int64_t len = std::min(kTile, V - j);
      const float* z = tile_values(x + j, len, tf, buf);
      if constexpr (std::is_same_v<O, float>) {
        tile_grad(z, len, label - j, lse[row], grad[row], tf, o + j);
      } else {
        tile_grad(z, len, label - j, lse[row], grad[row], tf, buf);
        store_tile(buf, len, o + j);
      }
    }
  }
}

// Calls f with a typed null pointer of t's dtype (one of the three row dtypes).
template <typename F>
void with_row_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return f(static_cast<c10::Half*>(nullptr));
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// One pass on the host before the parallel loop: an exception thrown inside an OpenMP region
// would terminate the process.  -1 skips a row; a label >= V says the row's label lies in another
// vocabulary tile (the vocabulary-tiled CPU driver): no one-hot here, never read.
void check_labels_cpu(const at::Tensor& labels, int64_t V, const char* op) {
  (void)V;
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(l[i] >= -1, op, ": label ", l[i], " at row ", i, " is negative and is not -1");
  }
}

// ---- ops ----

std::tuple<at::Tensor, at::Tensor> lse_gather_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                  std::optional<double> softcap, double inv_temp) {
  check_rows(logits_in, labels_in, "lse_gather");
  const Transform tf = make_transform(softcap_arg(softcap, inv_temp, "lse_gather"), inv_temp);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  check_labels_cpu(labels, V, "lse_gather");
  at::Tensor logp = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({n}, logits.options().dtype(at::kFloat));
  with_row_type(logits.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lse_gather_rows(logits.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(), n, V, tf,
                    logp.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
  });
  return {logp, lse};
}

void softmax_grad_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in, const at::Tensor& lse_in,
                      const at::Tensor& grad_in, std::optional<double> softcap, double inv_temp, at::Tensor& out) {
  check_rows(logits_in, labels_in, "softmax_grad");
  check_row_vector(lse_in, logits_in, "softmax_grad", "lse");
  check_row_vector(grad_in, logits_in, "softmax_grad", "grad");
  check_softmax_grad_out(out, logits_in);
  const Transform tf = make_transform(softcap_arg(softcap, inv_temp, "softmax_grad"), inv_temp);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  check_labels_cpu(labels, V, "softmax_grad");
  with_row_type(logits.scalar_type(), [&](auto* in_tag) {
    using T = std::remove_pointer_t<decltype(in_tag)>;
    with_row_type(out.scalar_type(), [&](auto* out_tag) {
      using O = std::remove_pointer_t<decltype(out_tag)>;
      softmax_grad_rows(logits.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                        grad.const_data_ptr<float>(), n, V, tf, out.mutable_data_ptr<O>());
    });
  });
}

at::Tensor segment_sum_cpu(const at::Tensor& values_in, const at::Tensor& segments_in, int64_t num_segments) {
  check_segments(values_in, segments_in, num_segments);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor segments = segments_in.contiguous();
  const float* v = values.const_data_ptr<float>();
  const int64_t* s = segments.const_data_ptr<int64_t>();
  // Serial, in double: n is the token count (thousands), and a sequence of thousands of
  // log-probs then sums to fp32 rounding of the exact value, in a fixed order.
  std::vector<double> acc(num_segments, 0.0);
  for (int64_t i = 0; i < values.numel(); ++i) {
    if (s[i] < 0) continue;
    TORCH_CHECK(s[i] < num_segments, "segment_sum: segment ", s[i], " at ", i, " is outside [0, ", num_segments,
                ") and is not -1");
    acc[s[i]] += v[i];
  }
  at::Tensor out = at::empty({num_segments}, values.options());
  float* o = out.mutable_data_ptr<float>();
  for (int64_t k = 0; k < num_segments; ++k) o[k] = static_cast<float>(acc[k]);
  return out;
}

std::tuple<at::Tensor, at::Tensor> loss_pass_cpu(const at::Tensor& policy_in, const at::Tensor& ref_in, double beta,
                                                 double dpo_weight, double copo_weight, double pair_weight,
                                                 double margin_weight, double anchor_weight, double anchor_delta,
                                                 bool anchor_contrast) {
  const LossParams p = loss_params(policy_in, ref_in, beta, dpo_weight, copo_weight, pair_weight, margin_weight,
                                   anchor_weight, anchor_delta, anchor_contrast);
  const at::Tensor policy = policy_in.contiguous();
  const at::Tensor ref = ref_in.contiguous();
  const int64_t B = policy.size(0);
  at::Tensor terms = at::empty({B, kNumTerms}, policy.options());
  at::Tensor grad = at::empty({B, kNumRoles}, policy.options());
  const float* pol = policy.const_data_ptr<float>();
  const float* rf = ref.const_data_ptr<float>();
  float* t = terms.mutable_data_ptr<float>();
  float* g = grad.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    loss_record(pol + b * kNumRoles, rf + b * kNumRoles, p, t + b * kNumTerms, g + b * kNumRoles);
  }
  return {terms, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(symmpo_fast, CPU, m) {
  m.impl("lse_gather", &lse_gather_cpu);
  m.impl("softmax_grad", &softmax_grad_cpu);
  m.impl("segment_sum", &segment_sum_cpu);
  m.impl("loss_pass", &loss_pass_cpu);
}

}  // namespace symmpo_fast
