// C++/OpenMP CPU kernel of the fused grouping op (groupvit_fast.ops.gumbel_assign_merge).
//
// Why it is faster than the eager chain: the eager code runs six [S x N x C] matrix products
// and a dozen [B,S,N] elementwise passes, and saves several [B,S,N] tensors for backward.
// Here the one-hot is exploited -- the forward merge Â·v and the gradient dv are segmented
// sums over each group's members (O(N·C)) -- and only A = q·kᵀ (forward; recomputed in
// backward), dÂ = dout·vᵀ, dq and dk are dense BLAS products. Nothing [B,S,N]-sized is saved:
// backward gets the argmax index per token (int32 [B,N]) and the per-group counts ([B,S]) and
// regenerates the Gumbel noise from the seed (counter-based Philox, grouping_common.h).
//
// Layout: q [B,S,C], k, v [B,N,C], logits [B,S,N] with the token axis contiguous, so the
// per-token loops over the group axis S run over chunks of consecutive tokens (vectorisable
// inner loop over the chunk).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "grouping_common.h"

namespace {

constexpr int64_t kChunk = 16;  // tokens per inner block

// ---------------------------------------------------------------------------------------
// Row kernels over n (contiguous), compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at load time (target_clones), since setup.py builds portable -O3 code. glibc's logf/expf do
// not vectorise, so the noise and softmax rows use Cephes-style polynomials (max error about
// 2 ulp in the ranges used here); Philox is plain 32-bit integer arithmetic and vectorises.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// no-trapping-math lets GCC if-convert the polynomial's selects, i.e. vectorise the rows.
#define GVF_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math")))
#else
#define GVF_CLONES
#endif
#define GVF_ALWAYS_INLINE inline __attribute__((always_inline))

GVF_ALWAYS_INLINE float bits_float(int32_t i) { return __builtin_bit_cast(float, i); }
GVF_ALWAYS_INLINE int32_t float_bits(float f) { return __builtin_bit_cast(int32_t, f); }

// log(x) for normal x > 0 (Cephes logf). For x in [sqrt(1/2), 1) it evaluates the polynomial
// at x - 1, which is exact, so -log(u) near u = 1 keeps full relative precision.
GVF_ALWAYS_INLINE float poly_logf(float x) {
  const int32_t ix = float_bits(x);
  int32_t e = ((ix >> 23) & 0xff) - 126;
  float m = bits_float((ix & 0x007fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// exp(x) for x <= 0 (Cephes expf); below -87 it returns ~1e-38 instead of 0, which a softmax
// whose largest term is exp(0) = 1 cannot tell apart.
GVF_ALWAYS_INLINE float poly_expf(float x) {
  x = x < -87.0f ? -87.0f : x;
  float fx = x * 1.44269504088896341f;
  fx = static_cast<float>(static_cast<int32_t>(fx - 0.5f));  // round to nearest (fx <= 0)
  x -= fx * 0.693359375f;
  x -= fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  return y * bits_float((static_cast<int32_t>(fx) + 127) << 23);
}

// out[n] = Gumbel noise of offsets base .. base+len-1 (same stream as gvf::gumbel_noise):
// one Philox4x32 call per four offsets into `words`, then the uniform -> Gumbel transform.
GVF_CLONES void gumbel_row(float* __restrict__ out, uint32_t* __restrict__ words, uint64_t seed,
                           uint64_t base, int64_t len) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t q0 = base >> 2;
  const int64_t nq = static_cast<int64_t>(((base + static_cast<uint64_t>(len) + 3) >> 2) - q0);
  for (int64_t i = 0; i < nq; ++i) {
    const uint64_t ctr = q0 + static_cast<uint64_t>(i);
    const gvf::U32x4 r = gvf::philox4x32(static_cast<uint32_t>(ctr),
                                         static_cast<uint32_t>(ctr >> 32), k0, k1);
    words[4 * i + 0] = r.x;
    words[4 * i + 1] = r.y;
    words[4 * i + 2] = r.z;
    words[4 * i + 3] = r.w;
  }
  const uint32_t* w = words + (base & 3u);
  for (int64_t j = 0; j < len; ++j) {
    float u = gvf::uint_to_uniform(w[j]);
    u = u < gvf::kUniformLo ? gvf::kUniformLo : (u > gvf::kUniformHi ? gvf::kUniformHi : u);
    out[j] = -poly_logf(-poly_logf(u));
  }
}

// scratch words for gumbel_row of `len` offsets
inline int64_t gumbel_words(int64_t len) { return 4 * (len / 4 + 2); }

// row[n] = exp(row[n] - m[n]); sum[n] += row[n]
GVF_CLONES void exp_sub_accum(float* __restrict__ row, const float* __restrict__ m,
                              float* __restrict__ sum, int64_t len) {
  for (int64_t n = 0; n < len; ++n) {
    const float e = poly_expf(row[n] - m[n]);
    row[n] = e;
    sum[n] += e;
  }
}

void exp_sub_accum(double* row, const double* m, double* sum, int64_t len) {
  for (int64_t n = 0; n < len; ++n) {
    const double e = std::exp(row[n] - m[n]);
    row[n] = e;
    sum[n] += e;
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "gumbel_assign_merge: expected q [B,S,C], k [B,N,C], v [B,N,C], got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && q.size(2) == k.size(2) &&
                  k.size(1) == v.size(1),
              "gumbel_assign_merge: shape mismatch: q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes(), " (expected q [B,S,C], k and v [B,N,C])");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "gumbel_assign_merge: q, k, v must share a dtype");
}

at::ScalarType acc_type_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// z = (A*scale + g)/tau written over A (in place), one token chunk at a time.
template <typename acc_t>
void noisy_logits_inplace(acc_t* A, int64_t B, int64_t S, int64_t N, acc_t scale, acc_t inv_tau,
                          bool gumbel, uint64_t seed) {
  at::parallel_for(0, B * S, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> noise(gumbel ? N : 0);
    std::vector<uint32_t> words(gumbel ? gumbel_words(N) : 0);
    for (int64_t bs = lo; bs < hi; ++bs) {
      acc_t* row = A + bs * N;
      if (gumbel) gumbel_row(noise.data(), words.data(), seed, static_cast<uint64_t>(bs) * N, N);
      for (int64_t n = 0; n < N; ++n)
        row[n] = (row[n] * scale + (gumbel ? static_cast<acc_t>(noise[n]) : acc_t(0))) * inv_tau;
    }
  });
}

// Row-wise (over S) softmax of logits [B,S,N] in place.
template <typename acc_t>
void softmax_over_groups_inplace(acc_t* Z, int64_t B, int64_t S, int64_t N) {
  at::parallel_for(0, B, 1, [&](int64_t blo, int64_t bhi) {
    for (int64_t b = blo; b < bhi; ++b) {
      acc_t* Zb = Z + b * S * N;
      for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
        const int64_t L = std::min(kChunk, N - n0);
        acc_t m[kChunk], sum[kChunk];
        for (int64_t j = 0; j < L; ++j) { m[j] = -std::numeric_limits<acc_t>::infinity(); sum[j] = 0; }
        for (int64_t s = 0; s < S; ++s) {
          const acc_t* row = Zb + s * N + n0;
          for (int64_t j = 0; j < L; ++j) m[j] = std::max(m[j], row[j]);
        }
        for (int64_t s = 0; s < S; ++s) {
          acc_t* row = Zb + s * N + n0;
          for (int64_t j = 0; j < L; ++j) { row[j] = std::exp(row[j] - m[j]); sum[j] += row[j]; }
        }
        for (int64_t j = 0; j < L; ++j) sum[j] = acc_t(1) / sum[j];
        for (int64_t s = 0; s < S; ++s) {
          acc_t* row = Zb + s * N + n0;
          for (int64_t j = 0; j < L; ++j) row[j] *= sum[j];
        }
      }
    }
  });
}

// Hard forward: argmax over S of the noisy logits (tau > 0 does not change it, so it is not
// applied), member counts and the segmented merge out[s] = Σ_{n in s} v[n] / (count_s + eps).
template <typename acc_t, typename in_t>
void hard_forward(const acc_t* A, const in_t* v, int64_t B, int64_t S, int64_t N, int64_t C,
                  acc_t scale, bool gumbel, uint64_t seed, acc_t eps, int32_t* idx, acc_t* cnt,
                  acc_t* out) {
  at::parallel_for(0, B, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<acc_t> best(N);
    std::vector<float> noise(gumbel ? N : 0);
    std::vector<uint32_t> words(gumbel ? gumbel_words(N) : 0);
    for (int64_t b = blo; b < bhi; ++b) {
      const acc_t* Ab = A + b * S * N;
      int32_t* ib = idx + b * N;
      // row-wise over the group axis: every inner loop runs over contiguous tokens
      for (int64_t n = 0; n < N; ++n) { best[n] = -std::numeric_limits<acc_t>::infinity(); ib[n] = 0; }
      for (int64_t s = 0; s < S; ++s) {
        const acc_t* row = Ab + s * N;
        if (gumbel)
          gumbel_row(noise.data(), words.data(), seed, static_cast<uint64_t>(b * S + s) * N, N);
        const int32_t si = static_cast<int32_t>(s);
        for (int64_t n = 0; n < N; ++n) {
          const acc_t z = row[n] * scale + (gumbel ? static_cast<acc_t>(noise[n]) : acc_t(0));
          // strict '>' keeps the first maximum, like torch.argmax
          const bool better = z > best[n];
          best[n] = better ? z : best[n];
          ib[n] = better ? si : ib[n];
        }
      }
      acc_t* cb = cnt + b * S;
      acc_t* ob = out + b * S * C;
      std::fill(cb, cb + S, acc_t(0));
      std::fill(ob, ob + S * C, acc_t(0));
      const in_t* vb = v + b * N * C;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t s = ib[n];
        cb[s] += acc_t(1);
        acc_t* o = ob + s * C;
        const in_t* vr = vb + n * C;
        for (int64_t c = 0; c < C; ++c) o[c] += static_cast<acc_t>(vr[c]);
      }
      for (int64_t s = 0; s < S; ++s) {
        const acc_t inv = acc_t(1) / (cb[s] + eps);
        acc_t* o = ob + s * C;
        for (int64_t c = 0; c < C; ++c) o[c] *= inv;
      }
    }
  });
}

// Hard backward, the part between the two BLAS products: given A (raw logits, overwritten
// with dA_raw) and G = dout·vᵀ (overwritten as scratch), recompute the softmax of the noisy
// logits per token and apply the normalisation + softmax gradients.
template <typename acc_t, typename in_t>
void hard_backward_tokens(acc_t* A, acc_t* G, const in_t* dout, int64_t B, int64_t S, int64_t N,
                          int64_t C, acc_t scale, acc_t inv_tau, bool gumbel, uint64_t seed,
                          acc_t eps, const int32_t* idx, const acc_t* cnt, acc_t* dv) {
  const acc_t scale_over_tau = scale * inv_tau;
  at::parallel_for(0, B, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<acc_t> D(S), inv_den(S), m(N), sum(N), ydy(N);
    std::vector<float> noise(gumbel ? N : 0);
    std::vector<uint32_t> words(gumbel ? gumbel_words(N) : 0);
    for (int64_t b = blo; b < bhi; ++b) {
      acc_t* Ab = A + b * S * N;
      acc_t* Gb = G + b * S * N;
      const int32_t* ib = idx + b * N;
      const acc_t* cb = cnt + b * S;
      for (int64_t s = 0; s < S; ++s) { inv_den[s] = acc_t(1) / (cb[s] + eps); D[s] = 0; }
      // D_s = Σ_m dÂ[s,m]·w[s,m] / (r_s + eps): with a one-hot w only the members count.
      for (int64_t n = 0; n < N; ++n) D[ib[n]] += Gb[ib[n] * N + n];
      for (int64_t s = 0; s < S; ++s) D[s] *= inv_den[s];
      for (int64_t n = 0; n < N; ++n) {
        m[n] = -std::numeric_limits<acc_t>::infinity(); sum[n] = 0; ydy[n] = 0;
      }
      for (int64_t s = 0; s < S; ++s) {  // z = (A·scale + g)/τ, running max over groups
        acc_t* row = Ab + s * N;
        if (gumbel)
          gumbel_row(noise.data(), words.data(), seed, static_cast<uint64_t>(b * S + s) * N, N);
        for (int64_t n = 0; n < N; ++n) {
          const acc_t z = (row[n] * scale + (gumbel ? static_cast<acc_t>(noise[n]) : acc_t(0))) * inv_tau;
          row[n] = z;
          m[n] = std::max(m[n], z);
        }
      }
      for (int64_t s = 0; s < S; ++s) exp_sub_accum(Ab + s * N, m.data(), sum.data(), N);
      for (int64_t n = 0; n < N; ++n) sum[n] = acc_t(1) / sum[n];
      for (int64_t s = 0; s < S; ++s) {  // y, dy and Σ_s y·dy
        acc_t* row = Ab + s * N;
        acc_t* grow = Gb + s * N;
        const acc_t ds = D[s], invd = inv_den[s];
        for (int64_t n = 0; n < N; ++n) {
          const acc_t y = row[n] * sum[n];
          const acc_t dy = gvf::norm_grad<acc_t>(grow[n], ds, invd);
          row[n] = y;
          grow[n] = dy;
          ydy[n] += y * dy;
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        acc_t* row = Ab + s * N;
        const acc_t* grow = Gb + s * N;
        for (int64_t n = 0; n < N; ++n)
          row[n] = gvf::softmax_grad<acc_t>(row[n], grow[n], ydy[n], scale_over_tau);
      }
      // dv[n] = dout[idx_n] / (count + eps): the transpose of the segmented merge.
      const in_t* db = dout + b * S * C;
      acc_t* dvb = dv + b * N * C;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t s = ib[n];
        const acc_t invd = inv_den[s];
        const in_t* dr = db + s * C;
        acc_t* o = dvb + n * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<acc_t>(dr[c]) * invd;
      }
    }
  });
}

at::Tensor logits(const at::Tensor& q, const at::Tensor& k) {
  // [B,S,C] @ [B,C,N] -> [B,S,N], unscaled (the scale is folded into the per-element pass)
  return at::bmm(q, k.transpose(1, 2)).contiguous();
}

}  // namespace

// Returns {out [B,S,C], idx int32 [B,N], cnt [B,S], hard_map, soft_map}; the maps are empty
// unless return_attn. For hard=False, cnt holds the soft row sums r_s and idx the argmax.
std::vector<at::Tensor> gvf_cpu_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                        const at::Tensor& v_in, double scale, bool gumbel,
                                        double tau, double eps, int64_t seed, bool hard,
                                        bool return_attn) {
  check_inputs(q_in, k_in, v_in);
  TORCH_CHECK(q_in.device().is_cpu(), "gvf_cpu_forward: expected CPU tensors");
  TORCH_CHECK(tau > 0, "gumbel_assign_merge: tau must be > 0, got ", tau);
  if (!gumbel) tau = 1.0;  // the official hard_softmax (eval) applies no temperature
  const auto in_dtype = q_in.scalar_type();
  const auto acc = acc_type_for(in_dtype);
  auto q = q_in.to(acc).contiguous();
  auto k = k_in.to(acc).contiguous();
  auto v = v_in.to(acc).contiguous();
  const int64_t B = q.size(0), S = q.size(1), C = q.size(2), N = k.size(1);
  const uint64_t useed = static_cast<uint64_t>(seed);
  auto A = logits(q, k);
  auto idx = at::empty({B, N}, q.options().dtype(at::kInt));
  auto cnt = at::empty({B, S}, q.options());
  at::Tensor out, hard_map, soft_map;
  if (return_attn) {
    soft_map = at::softmax(A * scale, 1).to(in_dtype);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "gvf_cpu_forward", [&] {
    using acc_t = scalar_t;
    if (hard) {
      out = at::empty({B, S, C}, q.options());
      hard_forward<acc_t, acc_t>(A.data_ptr<acc_t>(), v.data_ptr<acc_t>(), B, S, N, C,
                                 static_cast<acc_t>(scale), gumbel, useed, static_cast<acc_t>(eps),
                                 idx.data_ptr<int32_t>(), cnt.data_ptr<acc_t>(),
                                 out.data_ptr<acc_t>());
      if (return_attn) {
        hard_map = at::zeros({B, S, N}, q.options().dtype(in_dtype));
        hard_map.scatter_(1, idx.to(at::kLong).unsqueeze(1), 1.0);
      }
    } else {
      noisy_logits_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N, static_cast<acc_t>(scale),
                                  static_cast<acc_t>(1.0 / tau), gumbel, useed);
      softmax_over_groups_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N);  // A := y
      idx.copy_(A.argmax(1));
      cnt.copy_(A.sum(2));
      auto normed = A / (cnt.unsqueeze(2) + eps);
      out = at::bmm(normed, v);
      if (return_attn) hard_map = A.to(in_dtype);
    }
  });
  if (!return_attn) {
    hard_map = at::empty({0}, q_in.options());
    soft_map = at::empty({0}, q_in.options());
  }
  return {out.to(in_dtype), idx, cnt, hard_map, soft_map};
}

// Returns {dq, dk, dv} in the input dtype.
std::vector<at::Tensor> gvf_cpu_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                         const at::Tensor& k_in, const at::Tensor& v_in,
                                         const at::Tensor& idx_in, const at::Tensor& cnt_in,
                                         double scale, bool gumbel, double tau, double eps,
                                         int64_t seed, bool hard) {
  check_inputs(q_in, k_in, v_in);
  TORCH_CHECK(tau > 0, "gumbel_assign_merge: tau must be > 0, got ", tau);
  if (!gumbel) tau = 1.0;  // the official hard_softmax (eval) applies no temperature
  const auto in_dtype = q_in.scalar_type();
  const auto acc = acc_type_for(in_dtype);
  auto q = q_in.to(acc).contiguous();
  auto k = k_in.to(acc).contiguous();
  auto v = v_in.to(acc).contiguous();
  auto dout = dout_in.to(acc).contiguous();
  auto idx = idx_in.to(at::kInt).contiguous();
  auto cnt = cnt_in.to(acc).contiguous();
  const int64_t B = q.size(0), S = q.size(1), C = q.size(2), N = k.size(1);
  TORCH_CHECK(dout.sizes() == q.sizes(), "gvf_cpu_backward: grad_out ", dout.sizes(),
              " does not match out ", q.sizes());
  const uint64_t useed = static_cast<uint64_t>(seed);
  auto A = logits(q, k);
  auto G = at::bmm(dout, v.transpose(1, 2)).contiguous();  // dÂ [B,S,N]
  at::Tensor dv;
  AT_DISPATCH_FLOATING_TYPES(acc, "gvf_cpu_backward", [&] {
    using acc_t = scalar_t;
    if (hard) {
      dv = at::empty({B, N, C}, q.options());
      hard_backward_tokens<acc_t, acc_t>(A.data_ptr<acc_t>(), G.data_ptr<acc_t>(),
                                         dout.data_ptr<acc_t>(), B, S, N, C,
                                         static_cast<acc_t>(scale), static_cast<acc_t>(1.0 / tau),
                                         gumbel, useed, static_cast<acc_t>(eps),
                                         idx.data_ptr<int32_t>(), cnt.data_ptr<acc_t>(),
                                         dv.data_ptr<acc_t>());
    } else {
      // Soft assignment (hard=False, not used by the released model): dense, plain ATen.
      noisy_logits_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N, static_cast<acc_t>(scale),
                                  static_cast<acc_t>(1.0 / tau), gumbel, useed);
      softmax_over_groups_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N);  // A := y
      auto inv_den = 1.0 / (A.sum(2, true) + eps);                       // [B,S,1]
      auto normed = A * inv_den;
      dv = at::bmm(normed.transpose(1, 2), dout);
      auto D = (G * normed).sum(2, true);
      auto dy = (G - D) * inv_den;
      auto ydy = (A * dy).sum(1, true);
      A = A * (dy - ydy) * (scale / tau);
    }
  });
  auto dq = at::bmm(A, k);                   // [B,S,N] @ [B,N,C]
  auto dk = at::bmm(A.transpose(1, 2), q);   // [B,N,S] @ [B,S,C]
  return {dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype)};
}

// The Gumbel noise the CPU kernel draws for a [B,S,N] shape (tests compare it with Triton's
// tl.rand stream and with gvf::gumbel_noise, and check its distribution).
at::Tensor gvf_gumbel_noise(int64_t B, int64_t S, int64_t N, int64_t seed) {
  auto g = at::empty({B, S, N}, at::TensorOptions().dtype(at::kFloat));
  float* p = g.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  at::parallel_for(0, B * S, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> words(gumbel_words(N));
    for (int64_t bs = lo; bs < hi; ++bs)
      gumbel_row(p + bs * N, words.data(), useed, static_cast<uint64_t>(bs) * N, N);
  });
  return g;
}
