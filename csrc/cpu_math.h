// Scalar building blocks of the CPU row ops, written so that a `#pragma omp simd` loop over them
// vectorises: no calls into libm, no branches (every path is computed and one is selected), bit
// casts through memcpy.  The build must not use -ffast-math: the round-to-nearest trick in
// sf_exp relies on the addition and the subtraction of the magic constant not being folded.
#pragma once

#include <cstdint>
#include <cstring>

// Forced: GCC does not inline these plain-target helpers into the target_clones'd tile loops
// on its own, and a call per value would stop the loop vectorising at all.
#if defined(__GNUC__)
#define SF_INLINE inline __attribute__((always_inline))
#else
#define SF_INLINE inline
#endif

namespace symmpo_fast {

SF_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

SF_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) to about 1 ulp (Cephes' degree-6 polynomial on [-ln2/2, ln2/2]), 2^n through the
// exponent bits.  Inputs below -87.3 return ~1e-38 instead of 0 and inputs above 88 are
// clamped: harmless here, where x is z - max <= 0 or a bounded 2|x| inside sf_tanh.
SF_INLINE float sf_exp(float x) {
  x = x < -87.3365f ? -87.3365f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln2 to the nearest integer: adding 1.5 * 2^23 leaves the integer in the low
  // mantissa bits, so the same float also gives n's bits without a float->int conversion.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(f32_to_bits(shifted) - 0x4B400000u);
  float r = x - n * 0.693359375f;  // ln2 split in two so that r stays exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_f32(static_cast<uint32_t>(ni + 127) << 23);
}

// tanh(x): odd polynomial below |x| = 0.625 (where 1 - 2 / (e^2x + 1) would cancel), the exp
// form above; both are evaluated and one selected so the loop stays branch-free.
SF_INLINE float sf_tanh(float x) {
  const float a = x < 0.0f ? -x : x;
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  const float e = sf_exp(2.0f * (a > 10.0f ? 10.0f : a));  // tanh(10) is 1 in fp32
  float large = 1.0f - 2.0f / (e + 1.0f);
  large = x < 0.0f ? -large : large;
  return a < 0.625f ? small : large;
}

SF_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN rather than
// rounding into infinity.
SF_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// IEEE half -> float.  The 15 exponent+mantissa bits shifted into float position and scaled
// by 2^112 re-bias the exponent; the multiply also normalises subnormal halves.  Inf/NaN
// (exponent all ones) get the float exponent forced to all ones.  Trap: with denormals flushed
// (torch.set_flush_denormal(True)) a subnormal half (< 6.1e-5) scales a float subnormal and
// reads as 0.
SF_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const float scaled = bits_to_f32(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t infnan = em >= 0x7C00u ? 0x7F800000u : 0u;
  return bits_to_f32(f32_to_bits(scaled) | infnan | sign);
}

// float -> IEEE half, round to nearest even, as torch's .to(torch.float16).
SF_INLINE uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |f| >= 65520 rounds to inf; NaN -> quiet NaN.
  const uint32_t special = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // Subnormal halves (|f| < 2^-14): adding 0.5 in float aligns the half's subnormal mantissa
  // with the float's low bits, and the FPU rounds it to nearest even.
  const uint32_t sub = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u;
  // Normal halves: re-bias the exponent, round the 13 dropped bits to nearest even.
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t mag = a >= 0x477FF000u ? special : (a < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(mag | sign);
}

}  // namespace symmpo_fast
