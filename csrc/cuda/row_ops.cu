// CUDA kernels of the two per-row ops over logits [n, V]: lse_gather and softmax_grad.
//
// One block per row.  Each thread walks the row with a stride of the block, 8 values at a time
// through 16-byte loads where the row allows it, keeping an online (max, sum of exp) of its
// values; a warp-shuffle then shared-memory reduction gives the row's log-sum-exp.  Both ops
// are memory-bound (one read of the row; softmax_grad also one write), so the arithmetic in
// between is free.  Offsets are int64: row * V overflows int32 at V = 262144, n = 65536.
#include <type_traits>

#include "common.cuh"
#include "row_ops.cuh"

namespace symmpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    lse_gather_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t V, Transform tf,
                      float* __restrict__ logp, float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  MaxSum acc{kNegInf, 0.0f};
  if constexpr (kVectorised) {
    for (int64_t j = int64_t(threadIdx.x) * kVec; j < V; j += int64_t(kThreads) * kVec) {
      float v[kVec];
      load8(x + j, v);
      float vmax = kNegInf;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        v[k] = tf(v[k]);
        vmax = fmaxf(vmax, v[k]);
      }
      // One rescale per 8 values, not per value: about one exp per value in all.
      if (vmax > acc.m) {
        acc.s *= __expf(acc.m - vmax);
        acc.m = vmax;
      }
      if (acc.m == kNegInf) continue;  // every value so far is -inf: nothing to add
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc.s += __expf(v[k] - acc.m);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float z = tf(to_float(x[j]));
      if (z > acc.m) {
        acc.s = acc.s * __expf(acc.m - z) + 1.0f;
        acc.m = z;
      } else if (acc.m != kNegInf) {
        acc.s += __expf(z - acc.m);
      }
    }
  }
  const MaxSum total = block_reduce<kThreads>(acc);
  if (threadIdx.x == 0) {
    const float row_lse = total.m + logf(total.s);
    lse[row] = row_lse;
    const int64_t label = labels[row];
    float lp = 0.0f;
    if (label < -1) {
      lp = __int_as_float(0x7fc00000);  // NaN: an invalid label must not pass silently
    } else if (label >= 0 && label < V) {  // label >= V: it lies in another vocabulary tile
      lp = tf(to_float(x[label])) - row_lse;
    }
    logp[row] = lp;
  }
}

template <typename T, typename O, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_kernel(const T* logits, const int64_t* __restrict__ labels, const float* __restrict__ lse,
                        const float* __restrict__ grad, int64_t V, Transform tf, O* out) {
  // No __restrict__ on logits and out: they may be the same buffer.
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  O* o = out + row * V;
  const int64_t label = labels[row];
  // label >= V lies in another vocabulary tile: the softmax part only (j never equals it).
  if (label < 0) {  // skipped (or invalid) row: zero gradient, whatever lse holds
    for (int64_t j = threadIdx.x; j < V; j += kThreads) o[j] = from_float<O>(0.0f);
    return;
  }
  const float g = grad[row];
  const float row_lse = lse[row];
  // d logp / d z_v = onehot_v - softmax_v, then through the transform.
  auto dlogit = [&](int64_t j, float raw) {
    const float z = tf(raw);
    const float d = (j == label ? g : 0.0f) - g * __expf(z - row_lse);
    return d * tf.slope(z);
  };
  if constexpr (kVectorised) {
    for (int64_t j = int64_t(threadIdx.x) * kVec; j < V; j += int64_t(kThreads) * kVec) {
      float v[kVec];
      load8(x + j, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = dlogit(j + k, v[k]);
      store8(o + j, v);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) o[j] = from_float<O>(dlogit(j, to_float(x[j])));
  }
}

// Calls f with a typed null pointer of the dtype.
template <typename F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// 16-byte vector access needs every row start aligned: aligned bases and V a multiple of 8.
bool vectorisable(const void* a, const void* b, int64_t V) {
  return V % kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

Transform make_transform(float softcap, float inv_temp) {
  return {inv_temp, softcap, softcap > 0.0f ? 1.0f / softcap : 0.0f};
}

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit: one block per row

}  // namespace

cudaError_t lse_gather(const void* logits, DType dtype, const int64_t* labels, int64_t n, int64_t V,
                       float softcap, float inv_temp, float* logp, float* lse, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > kMaxGrid || V <= 0) return cudaErrorInvalidValue;
  const Transform tf = make_transform(softcap, inv_temp);
  const bool vec = vectorisable(logits, logits, V);
  return with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = static_cast<const T*>(logits);
    if (vec) {
      lse_gather_kernel<T, true><<<unsigned(n), kThreads, 0, stream>>>(x, labels, V, tf, logp, lse);
    } else {
      lse_gather_kernel<T, false><<<unsigned(n), kThreads, 0, stream>>>(x, labels, V, tf, logp, lse);
    }
    return cudaGetLastError();
  });
}

cudaError_t softmax_grad(const void* logits, DType dtype, const int64_t* labels, const float* lse,
                         const float* grad, int64_t n, int64_t V, float softcap, float inv_temp, void* out,
                         DType out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > kMaxGrid || V <= 0) return cudaErrorInvalidValue;
  const Transform tf = make_transform(softcap, inv_temp);
  const bool vec = vectorisable(logits, out, V);
  return with_type(dtype, [&](auto* in_tag) {
    using T = std::remove_pointer_t<decltype(in_tag)>;
    return with_type(out_dtype, [&](auto* out_tag) {
      using O = std::remove_pointer_t<decltype(out_tag)>;
      const T* x = static_cast<const T*>(logits);
      O* o = static_cast<O*>(out);
      if (vec) {
        softmax_grad_kernel<T, O, true><<<unsigned(n), kThreads, 0, stream>>>(x, labels, lse, grad, V, tf, o);
      } else {
        softmax_grad_kernel<T, O, false><<<unsigned(n), kThreads, 0, stream>>>(x, labels, lse, grad, V, tf, o);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace symmpo_fast
