// Per-element math of the fused grouping op, shared by the C++/OpenMP CPU kernel
// (grouping_cpu.cpp) and the CUDA kernels (grouping_kernels.cu).
//
// Everything here is a pure function of its arguments so the CPU and GPU kernels compute
// the same numbers (up to the last bits of their log/exp implementations): the Gumbel noise is a counter-based Philox4x32-10 draw keyed by the
// seed and indexed by the element's linear [B,S,N] offset (counter offset/4, word offset%4;
// the same stream as Triton's `tl.randint4x`), so no backend ever stores the noise, and the
// backward pass regenerates exactly the noise of its forward pass.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GVF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernel's vectorised row loops are target_clones/optimize-attributed
// functions, into which GCC does not inline plain inline functions.
#define GVF_HD inline __attribute__((always_inline))
#else
#define GVF_HD inline
#endif

namespace gvf {

// Philox4x32-10 constants (Salmon et al. 2011), the same ones Triton uses.
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

GVF_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

struct U32x4 {
  uint32_t x, y, z, w;
};

// Philox4x32-10 of counter (c0, c1, 0, 0) and key (k0, k1): Triton's `tl.randint4x`.
GVF_HD U32x4 philox4x32(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// The random word of element `offset`: one Philox4x32-10 call serves four consecutive offsets
// (counter = offset / 4, word = offset % 4), a quarter of the cost of one call per element.
// Triton draws it as `tl.randint4x(seed, offset // 4)` and selects word offset % 4.
GVF_HD uint32_t philox_word(uint64_t seed, uint64_t offset) {
  const uint64_t ctr = offset >> 2;
  const U32x4 r = philox4x32(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
                             static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t lane = static_cast<uint32_t>(offset & 3u);
  return lane == 0 ? r.x : (lane == 1 ? r.y : (lane == 2 ? r.z : r.w));
}

// Triton's uint_to_uniform_float: a uint32 as int32, negatives folded with ~x, times
// (2^23-1)/2^23 * 2^-31 so the largest value stays below 1.0f. Result in [0, 1).
GVF_HD float uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  i = i < 0 ? ~i : i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// The uniform is clamped into [2^-24, 1 - 2^-24] before -log(-log(u)): u == 0 would give
// -inf and u == 1 would give +inf (pytorch #22442, #41663). The resulting noise is bounded by
// about [-2.8, 16.6], so (A + g) / tau is finite whenever A is.
constexpr float kUniformLo = 5.9604644775390625e-08f;   // 2^-24
constexpr float kUniformHi = 0.99999994039535522461f;   // 1 - 2^-24

GVF_HD float gumbel_from_uniform(float u) {
  u = u < kUniformLo ? kUniformLo : (u > kUniformHi ? kUniformHi : u);
  // -log(u) is tiny near u = 1, where an approximate logf (nvcc --use_fast_math turns logf
  // into __logf, absolute error ~2^-21) could return <= 0 and the outer log a NaN. u - 1 is
  // exact for u >= 0.5, and log1pf has no fast-math intrinsic, so the upper half stays exact.
  const float e = u > 0.5f ? -log1pf(u - 1.0f) : -logf(u);
  return -logf(e);
}

// Gumbel(0,1) noise of element `offset` = (b*S + s)*N + n of the [B,S,N] logits.
GVF_HD float gumbel_noise(uint64_t seed, uint64_t offset) {
  return gumbel_from_uniform(uint_to_uniform(philox_word(seed, offset)));
}

// Noisy, tempered logit: z = (A*scale + g)/tau, in the accumulation type.
template <typename acc_t>
GVF_HD acc_t assign_logit(acc_t a_raw, acc_t scale, acc_t inv_tau, bool gumbel, uint64_t seed,
                          uint64_t offset) {
  acc_t z = a_raw * scale;
  if (gumbel) z += static_cast<acc_t>(gumbel_noise(seed, offset));
  return z * inv_tau;
}

// Gradient of the normalised assignment with respect to the (soft) assignment weight:
//   Â[s,n] = w[s,n] / (r_s + eps),  r_s = Σ_n w[s,n]
//   dw[s,n] = (dÂ[s,n] - D_s) / (r_s + eps),  D_s = Σ_m dÂ[s,m] w[s,m] / (r_s + eps)
// The denominator's gradient is the -D_s term.
template <typename acc_t>
GVF_HD acc_t norm_grad(acc_t dnormed, acc_t d_s, acc_t inv_den_s) {
  return (dnormed - d_s) * inv_den_s;
}

// Softmax-over-groups Jacobian-vector product for one element:
//   dz[s] = y[s] * (dy[s] - Σ_s' y[s'] dy[s'])   and   dA_raw = dz * scale / tau.
template <typename acc_t>
GVF_HD acc_t softmax_grad(acc_t y, acc_t dy, acc_t ydy_sum, acc_t scale_over_tau) {
  return y * (dy - ydy_sum) * scale_over_tau;
}

}  // namespace gvf
