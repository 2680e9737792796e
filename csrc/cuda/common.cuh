// Device helpers of the row kernels: dtype conversion, 8-wide vector loads and stores, the
// logit transform, and the warp/block reduction of an online log-sum-exp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace symmpo_fast {
namespace cuda {

constexpr float kNegInf = -__builtin_huge_valf();

// Values each thread handles per step of the vectorised path: 16 bytes of 16-bit values, two
// 16-byte loads of fp32.
constexpr int kVec = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The caller guarantees 16-byte alignment of p (host-side check of base pointers and V % 8).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = to_float(h[k]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = from_float<T>(v[k]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// tanh through exp(-2|y|), as the Triton kernel computes it (kernels/head.py): never overflows,
// and its error is absolute, ~1 ulp of 1, i.e. ~1 ulp of softcap once scaled.  Not tanhf:
// setup.py compiles with --use_fast_math, which turns tanhf into the hardware tanh.approx
// (MUFU.TANH), ~1e-5 relative error, above what the softcap tests allow.
// tests/test_cuda_compile.py checks the PTX and SASS for it.
__device__ __forceinline__ float tanh_via_exp(float y) {
  const float t = __expf(-2.0f * fabsf(y));
  return copysignf((1.0f - t) / (1.0f + t), y);
}

// z = softcap * tanh(x * inv_temp / softcap), or x * inv_temp; softcap 0 means none.
struct Transform {
  float inv_temp;
  float softcap;
  float inv_softcap;

  __device__ __forceinline__ float operator()(float x) const {
    const float y = x * inv_temp;
    return softcap > 0.0f ? softcap * tanh_via_exp(y * inv_softcap) : y;
  }
  // dz/dx as a function of z: tanh' = 1 - tanh^2 with tanh(.) = z / softcap.
  __device__ __forceinline__ float slope(float z) const {
    return softcap > 0.0f ? (1.0f - z * z * inv_softcap * inv_softcap) * inv_temp : inv_temp;
  }
};

// Running (max m, sum s of exp(z - m)) of an online log-sum-exp.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == kNegInf) return {kNegInf, 0.0f};  // both empty; exp(-inf - -inf) would be NaN
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// Block-wide combine; the result is valid in every thread.  kThreads: a multiple of 32, <= 1024.
template <int kThreads>
__device__ __forceinline__ MaxSum block_reduce(MaxSum v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one block");
  constexpr int kWarps = kThreads / 32;
  __shared__ MaxSum partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kWarps ? partial[lane] : MaxSum{kNegInf, 0.0f};
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, o);
  }
  return v;
}

}  // namespace cuda
}  // namespace symmpo_fast
