// Host-side interface of the CUDA kernels: launchers on raw pointers, sizes and a stream.
//
// No torch types cross this boundary, so every .cu file compiles with nvcc alone (a CUDA
// extension cannot be built against a CPU-only torch, and the CUDA-compile test builds them
// anywhere nvcc exists); csrc/cuda_bindings.cpp wraps these as torch ops.  Each launcher
// returns the launch's cudaError_t and does not synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../loss_math.h"

namespace symmpo_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// logits [n, V] contiguous of `dtype`; labels [n] (-1: skip, logp 0); softcap 0 means none.
// logp, lse: [n] fp32.  A label outside [-1, V) gets logp NaN (the driver checks labels on the
// host first; the kernel must not read out of bounds).
cudaError_t lse_gather(const void* logits, DType dtype, const int64_t* labels, int64_t n, int64_t V,
                       float softcap, float inv_temp, float* logp, float* lse, cudaStream_t stream);

// out [n, V] contiguous of `out_dtype` (may be logits itself: every value is read before it is
// written, by the same thread) = d(sum_i grad_i * logp_i) / d logits.
cudaError_t softmax_grad(const void* logits, DType dtype, const int64_t* labels, const float* lse,
                         const float* grad, int64_t n, int64_t V, float softcap, float inv_temp, void* out,
                         DType out_dtype, cudaStream_t stream);

// out [num_segments] = per-segment sums of values [n]; segment -1 (or out of range) is skipped.
// Float atomics: the summation order, hence the last bits, may vary from run to run.
cudaError_t segment_sum(const float* values, const int64_t* segments, int64_t n, int64_t num_segments,
                        float* out, cudaStream_t stream);

// policy, ref [B, 5] -> terms [B, kNumTerms], grad [B, kNumRoles]; see loss_math.h.
cudaError_t loss_pass(const float* policy, const float* ref, int64_t B, LossParams params, float* terms,
                      float* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace symmpo_fast
