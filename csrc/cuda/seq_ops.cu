// CUDA kernels of the two per-sequence ops: segment_sum (token log-probs -> sequence sums) and
// loss_pass (the preference loss of each record and its gradient, math in loss_math.h).
#include "row_ops.cuh"

namespace symmpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Consecutive values one thread sums before it flushes: the driver hands segments in runs (a
// sequence's tokens are contiguous), so a thread mostly adds into a register and issues one
// atomic per run it touches rather than one per value.
constexpr int kSpan = 16;

__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const float* __restrict__ values, const int64_t* __restrict__ segments, int64_t n,
                       int64_t num_segments, float* __restrict__ out) {
  const int64_t start = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kSpan;
  const int64_t stop = start + kSpan < n ? start + kSpan : n;
  int64_t current = -1;
  float acc = 0.0f;
  for (int64_t i = start; i < stop; ++i) {
    const int64_t s = segments[i];
    if (s != current) {
      if (current >= 0) atomicAdd(out + current, acc);
      // -1 and out-of-range ids are skipped (the driver validates ids on the host).
      current = s >= 0 && s < num_segments ? s : -1;
      acc = 0.0f;
    }
    acc += values[i];
  }
  if (current >= 0) atomicAdd(out + current, acc);
}

__global__ void __launch_bounds__(kThreads)
    loss_pass_kernel(const float* __restrict__ policy, const float* __restrict__ ref, int64_t B, LossParams p,
                     float* __restrict__ terms, float* __restrict__ grad) {
  const int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  loss_record(policy + b * kNumRoles, ref + b * kNumRoles, p, terms + b * kNumTerms, grad + b * kNumRoles);
}

}  // namespace

cudaError_t segment_sum(const float* values, const int64_t* segments, int64_t n, int64_t num_segments,
                        float* out, cudaStream_t stream) {
  if (num_segments == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float) * size_t(num_segments), stream);
  if (err != cudaSuccess || n == 0) return err;
  const int64_t per_block = int64_t(kThreads) * kSpan;
  const int64_t blocks = (n + per_block - 1) / per_block;
  segment_sum_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(values, segments, n, num_segments, out);
  return cudaGetLastError();
}

cudaError_t loss_pass(const float* policy, const float* ref, int64_t B, LossParams params, float* terms,
                      float* grad, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int64_t blocks = (B + kThreads - 1) / kThreads;
  loss_pass_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(policy, ref, B, params, terms, grad);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace symmpo_fast
