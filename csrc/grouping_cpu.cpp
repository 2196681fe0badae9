// C++/OpenMP CPU kernel of the fused grouping op (groupvit_fast.ops.gumbel_assign_merge).
//
// Why it is faster than the eager chain: the eager code runs six [S x N x C] matrix products
// and a dozen [B,S,N] elementwise passes, and saves several [B,S,N] tensors for backward.
// Here the one-hot is exploited -- the forward merge Â·v and the gradient dv are segmented
// sums over each group's members (O(N·C)) -- and only A = q·kᵀ (forward; recomputed in
// backward), dÂ = dout·vᵀ, dq and dk are dense products. Nothing [B,S,N]-sized is saved:
// backward gets the argmax index per token (int32 [B,N]) and the per-group counts ([B,S]) and
// regenerates the Gumbel noise from the seed (counter-based Philox, grouping_common.h).
//
// Fused per image (hard assignment, the released model): forward and backward each walk the
// batch once (at::parallel_for over b), and for one image do every product and elementwise
// step while its k_b, v_b are cache-resident, with the [S,N] logits in a per-thread scratch.
// So k and v cross the memory bus once per call (the former whole-tensor bmm passes read them
// twice in backward), dv and dk are streamed out with non-temporal stores, the next operand is
// prefetched during the current product, and the large outputs get transparent huge pages.
// Small images (stage 2) use register-tiled fp32 micro-kernels, larger ones BLAS.
//
// Layout: q [B,S,C], k, v [B,N,C], logits [B,S,N] with the token axis contiguous, so the
// per-token loops over the group axis S run over chunks of consecutive tokens (vectorisable
// inner loop over the chunk).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GVF_HAVE_SSE 1
#endif

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

// ---------------------------------------------------------------------------------------
// Per-image GEMMs. The fused passes below work one image b at a time, so that k_b and v_b
// (N x C) are read from DRAM once and stay cache-resident while every product and
// elementwise step of that image uses them. Their products are small (S x N x C), where a
// dispatcher call per product would cost more than the product, so they go straight to the
// BLAS torch links against (Fortran sgemm_/dgemm_, exported by libtorch_cpu with MKL or
// OpenBLAS). The symbols are weak: a torch built without a BLAS leaves them null and the
// plain loops below run instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline bool have_blas(float*) { return sgemm_ != nullptr; }
inline bool have_blas(double*) { return dgemm_ != nullptr; }

// ---------------------------------------------------------------------------------------
// fp32 register-tiled micro-kernels for the per-image products. At these sizes (stage 2: an
// 8 x 64 x 384 product per image) a BLAS call spends more time packing its operands than
// multiplying, and its packing pass is a separate, unoverlapped walk over k_b / v_b; these
// kernels read the operands in place (k_b / v_b rows streamed once, the small q_b / dout_b /
// dA_b from L1) and keep every accumulator in registers. fp32 accumulation throughout.
// Compiled twice: AVX2+FMA (picked at load time when the CPU has it) and baseline x86-64.
// (v8sf never crosses a call boundary -- every helper taking one is always_inline -- so the
// baseline build's "AVX vector return changes the ABI" note does not apply.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v8sf __attribute__((vector_size(32)));

GVF_ALWAYS_INLINE v8sf load8(const float* p) {
  v8sf r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
GVF_ALWAYS_INLINE void store8(float* p, v8sf v) { std::memcpy(p, &v, sizeof(v)); }
GVF_ALWAYS_INLINE float hsum8(v8sf v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// C[i,j] = Σ_p A[i,p]·B[j,p] for an MR x NR tile (both operands contiguous along p).
template <int MR, int NR>
GVF_ALWAYS_INLINE void nt_tile(const float* A, int64_t lda, const float* Bm, int64_t ldb,
                               int64_t K, float* C, int64_t ldc) {
  v8sf acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = v8sf{};
  int64_t p = 0;
  for (; p + 8 <= K; p += 8) {
    v8sf b[NR];
    for (int j = 0; j < NR; ++j) b[j] = load8(Bm + j * ldb + p);
    for (int i = 0; i < MR; ++i) {
      const v8sf a = load8(A + i * lda + p);
      for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float t = hsum8(acc[i][j]);
      for (int64_t r = p; r < K; ++r) t += A[i * lda + r] * Bm[j * ldb + r];
      C[i * ldc + j] = t;
    }
}

// C [M,N] = A [M,K] · B [N,K]ᵀ
GVF_ALWAYS_INLINE void gemm_nt_impl(int64_t M, int64_t N, int64_t K, const float* A,
                                    int64_t lda, const float* Bm, int64_t ldb, float* C,
                                    int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 <= N; j += 2) {  // B rows (k_b / v_b tokens) outer: each read once
    int64_t i = 0;
    for (; i + 4 <= M; i += 4)
      nt_tile<4, 2>(A + i * lda, lda, Bm + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; i < M; ++i) nt_tile<1, 2>(A + i * lda, lda, Bm + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
  for (; j < N; ++j) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4)
      nt_tile<4, 1>(A + i * lda, lda, Bm + j * ldb, ldb, K, C + i * ldc + j, ldc);
    for (; i < M; ++i) nt_tile<1, 1>(A + i * lda, lda, Bm + j * ldb, ldb, K, C + i * ldc + j, ldc);
  }
}

// C[i, c0 .. c0+8·NV) = Σ_p a(i,p)·B[p, ...] for MR rows; a(i,p) = A[i*lda+p], or with TA
// A[p*lda+i]. B contiguous along the columns.
template <int MR, int NV, bool TA, bool STREAM>
GVF_ALWAYS_INLINE void nn_tile(const float* A, int64_t lda, const float* Bm, int64_t ldb,
                               int64_t K, float* C, int64_t ldc) {
  v8sf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = v8sf{};
  for (int64_t p = 0; p < K; ++p) {
    v8sf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load8(Bm + p * ldb + 8 * v);
    for (int i = 0; i < MR; ++i) {
      const float a = TA ? A[p * lda + i] : A[i * lda + p];
      const v8sf av = v8sf{} + a;
      for (int v = 0; v < NV; ++v) acc[i][v] += av * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
#ifdef GVF_HAVE_SSE
      if constexpr (STREAM) {  // C 16-byte aligned (checked by the caller)
        __m128 lo, hi;
        std::memcpy(&lo, &acc[i][v], 16);
        std::memcpy(&hi, reinterpret_cast<const char*>(&acc[i][v]) + 16, 16);
        _mm_stream_ps(C + i * ldc + 8 * v, lo);
        _mm_stream_ps(C + i * ldc + 8 * v + 4, hi);
        continue;
      }
#endif
      store8(C + i * ldc + 8 * v, acc[i][v]);
    }
}

template <int MR, bool TA, bool STREAM>
GVF_ALWAYS_INLINE void nn_rows(const float* A, int64_t lda, const float* Bm, int64_t ldb,
                               int64_t N, int64_t K, float* C, int64_t ldc) {
  int64_t c = 0;
  for (; c + 24 <= N; c += 24) nn_tile<MR, 3, TA, STREAM>(A, lda, Bm + c, ldb, K, C + c, ldc);
  for (; c + 8 <= N; c += 8) nn_tile<MR, 1, TA, STREAM>(A, lda, Bm + c, ldb, K, C + c, ldc);
  for (; c < N; ++c)
    for (int i = 0; i < MR; ++i) {
      float t = 0;
      for (int64_t p = 0; p < K; ++p) t += (TA ? A[p * lda + i] : A[i * lda + p]) * Bm[p * ldb + c];
      C[i * ldc + c] = t;
    }
}

// C [M,N] = op(A) · B [K,N], op(A) = A [M,K] or, with TA, A [K,M]ᵀ. STREAM: C is written
// with non-temporal stores (it must be 16-byte aligned with ldc a multiple of 4).
template <bool TA, bool STREAM>
GVF_ALWAYS_INLINE void gemm_nn_impl(int64_t M, int64_t N, int64_t K, const float* A,
                                    int64_t lda, const float* Bm, int64_t ldb, float* C,
                                    int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4)
    nn_rows<4, TA, STREAM>(TA ? A + i : A + i * lda, lda, Bm, ldb, N, K, C + i * ldc, ldc);
  for (; i < M; ++i)
    nn_rows<1, TA, STREAM>(TA ? A + i : A + i * lda, lda, Bm, ldb, N, K, C + i * ldc, ldc);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GVF_AVX2_FMA __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
#define GVF_HAVE_AVX2_CLONE 1
#endif

using gemm_f32_fn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                             int64_t, float*, int64_t);
struct GemmF32 {
  gemm_f32_fn nt, nn, tn, tn_stream;
};
#define GVF_GEMM_VARIANTS(SUFFIX, ATTR)                                                        \
  ATTR void gemm_nt_##SUFFIX(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,    \
                             const float* Bm, int64_t ldb, float* C, int64_t ldc) {           \
    gemm_nt_impl(M, N, K, A, lda, Bm, ldb, C, ldc);                                           \
  }                                                                                           \
  ATTR void gemm_nn_##SUFFIX(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,    \
                             const float* Bm, int64_t ldb, float* C, int64_t ldc) {           \
    gemm_nn_impl<false, false>(M, N, K, A, lda, Bm, ldb, C, ldc);                             \
  }                                                                                           \
  ATTR void gemm_tn_##SUFFIX(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,    \
                             const float* Bm, int64_t ldb, float* C, int64_t ldc) {           \
    gemm_nn_impl<true, false>(M, N, K, A, lda, Bm, ldb, C, ldc);                              \
  }                                                                                           \
  ATTR void gemm_tns_##SUFFIX(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,   \
                              const float* Bm, int64_t ldb, float* C, int64_t ldc) {          \
    gemm_nn_impl<true, true>(M, N, K, A, lda, Bm, ldb, C, ldc);                               \
  }
GVF_GEMM_VARIANTS(base, )
#ifdef GVF_HAVE_AVX2_CLONE
GVF_GEMM_VARIANTS(avx2, GVF_AVX2_FMA)
#endif

const GemmF32& gemm_f32() {
  static const GemmF32 k = [] {
#ifdef GVF_HAVE_AVX2_CLONE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return GemmF32{gemm_nt_avx2, gemm_nn_avx2, gemm_tn_avx2, gemm_tns_avx2};
#endif
    return GemmF32{gemm_nt_base, gemm_nn_base, gemm_tn_base, gemm_tns_base};
  }();
  return k;
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* Bm, int64_t ldb, T* C, int64_t ldc);

// The per-image products of the fused passes. fp32 images with a small assignment
// (S·N <= kMicroMaxSN: stage 2, S=8, N=64) use the micro-kernels, larger ones (stage 1,
// S=64, N=196, where BLAS runs at a good fraction of peak) and fp64 (the gradcheck /
// reference-precision path) use BLAS. Measured with bench/grouping.py at the release shapes.
constexpr int64_t kMicroMaxSN = 2048;

template <typename T>
inline bool use_micro(int64_t S, int64_t N) {
  return std::is_same_v<T, float> && S * N <= kMicroMaxSN;
}

//   C [M,N] = A [M,K]·B [N,K]ᵀ
template <typename T>
inline void img_gemm_nt(bool micro, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                        const T* Bm, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>)
    if (micro) return gemm_f32().nt(M, N, K, A, lda, Bm, ldb, C, ldc);
  gemm_rm<T>(false, true, M, N, K, A, lda, Bm, ldb, C, ldc);
}
//   C [M,N] = A [M,K]·B [K,N]
template <typename T>
inline void img_gemm_nn(bool micro, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                        const T* Bm, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>)
    if (micro) return gemm_f32().nn(M, N, K, A, lda, Bm, ldb, C, ldc);
  gemm_rm<T>(false, false, M, N, K, A, lda, Bm, ldb, C, ldc);
}
//   C [M,N] = A [K,M]ᵀ·B [K,N]; the micro-kernel streams C past the cache when it is aligned
template <typename T>
inline void img_gemm_tn(bool micro, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                        const T* Bm, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (micro) {
      const bool aligned = (reinterpret_cast<uintptr_t>(C) & 15u) == 0 && ldc % 4 == 0;
      return (aligned ? gemm_f32().tn_stream : gemm_f32().tn)(M, N, K, A, lda, Bm, ldb, C, ldc);
    }
  }
  gemm_rm<T>(true, false, M, N, K, A, lda, Bm, ldb, C, ldc);
}

// Software prefetch (into L2) of a buffer the next phase reads, issued in slices while the
// current phase computes: the small-image passes would otherwise stall on DRAM at each
// image's first product instead of overlapping the next operand's transfer with arithmetic.
inline void prefetch_slice(const void* base, int64_t bytes, int part, int parts) {
  if (!base) return;
  const char* c = static_cast<const char*>(base);
  const int64_t lo = (bytes * part / parts) & ~int64_t(63), hi = bytes * (part + 1) / parts;
  for (int64_t o = lo; o < hi; o += 64) __builtin_prefetch(c + o, 0, 2);
}
constexpr int kPrefetchParts = 8;

//   img_gemm_nt in column blocks, prefetching [pf, pf + pf_bytes) meanwhile (pf may be null)
template <typename T>
inline void img_gemm_nt_pf(bool micro, int64_t M, int64_t N, int64_t K, const T* A,
                           int64_t lda, const T* Bm, int64_t ldb, T* C, int64_t ldc,
                           const void* pf, int64_t pf_bytes) {
  if (!pf || N < kPrefetchParts) {
    img_gemm_nt<T>(micro, M, N, K, A, lda, Bm, ldb, C, ldc);
    prefetch_slice(pf, pf_bytes, 0, 1);
    return;
  }
  for (int p = 0; p < kPrefetchParts; ++p) {
    const int64_t j0 = N * p / kPrefetchParts, j1 = N * (p + 1) / kPrefetchParts;
    img_gemm_nt<T>(micro, M, j1 - j0, K, A, lda, Bm + j0 * ldb, ldb, C + j0, ldc);
    prefetch_slice(pf, pf_bytes, p, kPrefetchParts);
  }
}

// Streaming (non-temporal) writes of the big [B,N,C] gradients: each row is written once and
// not read again here, so bypassing the cache saves the read-for-ownership of every line
// (half the DRAM traffic of a write). dst[c] = src[c] * a; plain stores where unaligned.
// Callers end their loop with stream_fence().
template <typename T>
inline void stream_scaled(T* __restrict__ dst, const T* __restrict__ src, T a, int64_t len) {
  int64_t c = 0;
#ifdef GVF_HAVE_SSE
  if constexpr (std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
      const __m128 va = _mm_set1_ps(a);
      for (; c + 4 <= len; c += 4) _mm_stream_ps(dst + c, _mm_mul_ps(_mm_loadu_ps(src + c), va));
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
      const __m128d va = _mm_set1_pd(a);
      for (; c + 2 <= len; c += 2) _mm_stream_pd(dst + c, _mm_mul_pd(_mm_loadu_pd(src + c), va));
    }
  }
#endif
  for (; c < len; ++c) dst[c] = src[c] * a;
}

inline void stream_fence() {
#ifdef GVF_HAVE_SSE
  _mm_sfence();
#endif
}

// The op's large outputs (dk, dv [B,N,C], out [B,S,C] at stage 1): tens of MB that torch's
// CPU allocator takes fresh from the kernel on every call, so writing them first costs one
// page fault per 4 KiB -- measured at stage 2 (B=256) as ~13k faults and about as much system
// time as the whole backward's arithmetic. Where transparent huge pages are available on
// request (THP "madvise", the common default), ask for them on the 2 MiB-aligned interior of
// the buffer before the first write: 512x fewer faults. No effect on the values.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t hi = lo + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t alo = (lo + kHuge - 1) & ~(kHuge - 1), ahi = hi & ~(kHuge - 1);
  if (ahi >= alo + 2 * kHuge) (void)madvise(reinterpret_cast<void*>(alo), ahi - alo, MADV_HUGEPAGE);
#endif
  return t;
}

// Row-major C[M,N] = op(A)·op(B) (overwritten), op(A) M x K, op(B) K x N; A is stored M x K
// (lda) or, with ta, K x M; likewise B. Row-major C is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so the
// column-major BLAS call swaps the operands and keeps each one's transpose flag.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* Bm, int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (have_blas(static_cast<T*>(nullptr)) && M <= kIntMax && N <= kIntMax && K <= kIntMax &&
      lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
    const T one = 1, zero = 0;
    blas_gemm(&ctb, &cta, &m, &n, &k, &one, Bm, &ia, A, &ib, &zero, C, &ic);
    return;
  }
  // fallback: plain loops, the inner one over contiguous columns of C where possible
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    std::fill(c, c + N, T(0));
    for (int64_t p = 0; p < K; ++p) {
      const T a = ta ? A[p * lda + i] : A[i * lda + p];
      if (!tb) {
        const T* b = Bm + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] += a * Bm[j * ldb + p];
      }
    }
  }
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

// Hard forward, fused per image: A_b = q_b·k_bᵀ (raw logits, written to `A` when it is
// non-null, else to a per-thread [S,N] scratch), the argmax over S of the noisy logits (tau > 0
// does not change it, so it is not applied), the member counts and the segmented merge
// out[s] = Σ_{n in s} v[n] / (count_s + eps), while k_b and v_b are cache-resident.
template <typename acc_t>
void hard_forward(const acc_t* q, const acc_t* k, const acc_t* v, int64_t B, int64_t S,
                  int64_t N, int64_t C, acc_t scale, bool gumbel, uint64_t seed, acc_t eps,
                  int32_t* idx, acc_t* cnt, acc_t* out, acc_t* A) {
  const bool micro = use_micro<acc_t>(S, N);
  at::parallel_for(0, B, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<acc_t> best(N), scratch(A ? 0 : S * N);
    std::vector<float> noise(gumbel ? N : 0);
    std::vector<uint32_t> words(gumbel ? gumbel_words(N) : 0);
    for (int64_t b = blo; b < bhi; ++b) {
      acc_t* Ab = A ? A + b * S * N : scratch.data();
      // small images: fetch v_b during the product, k_{b+1} during the merge
      const int64_t kv_bytes = N * C * static_cast<int64_t>(sizeof(acc_t));
      const acc_t* vb = v + b * N * C;
      const acc_t* knext = micro && b + 1 < bhi ? k + (b + 1) * N * C : nullptr;
      img_gemm_nt_pf<acc_t>(micro, S, N, C, q + b * S * C, C, k + b * N * C, C, Ab, N,
                            micro ? vb : nullptr, kv_bytes);
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
      const int64_t pf_every = std::max<int64_t>(1, N / kPrefetchParts);
      for (int64_t n = 0; n < N; ++n) {
        if (knext && n % pf_every == 0)
          prefetch_slice(knext, kv_bytes, static_cast<int>(n / pf_every), kPrefetchParts);
        const int64_t s = ib[n];
        cb[s] += acc_t(1);
        acc_t* o = ob + s * C;
        const acc_t* vr = vb + n * C;
        for (int64_t c = 0; c < C; ++c) o[c] += vr[c];
      }
      for (int64_t s = 0; s < S; ++s) {
        const acc_t inv = acc_t(1) / (cb[s] + eps);
        acc_t* o = ob + s * C;
        for (int64_t c = 0; c < C; ++c) o[c] *= inv;
      }
    }
  });
}

// Hard backward of one image, the part between the products: given Ab = A_b (raw logits,
// overwritten with dA_raw) and Gb = dout_b·v_bᵀ (overwritten as scratch), recompute the
// softmax of the noisy logits per token and apply the normalisation + softmax gradients; write
// dv_b. D, inv_den [S] and m, sum, ydy [N] are scratch; noise/words as for gumbel_row.
template <typename acc_t>
void hard_backward_tokens(acc_t* Ab, acc_t* Gb, const acc_t* db, int64_t b, int64_t S,
                          int64_t N, int64_t C, acc_t scale, acc_t inv_tau, bool gumbel,
                          uint64_t seed, acc_t eps, const int32_t* ib, const acc_t* cb,
                          acc_t* dvb, acc_t* D, acc_t* inv_den, acc_t* m, acc_t* sum, acc_t* ydy,
                          float* noise, uint32_t* words) {
  const acc_t scale_over_tau = scale * inv_tau;
  for (int64_t s = 0; s < S; ++s) { inv_den[s] = acc_t(1) / (cb[s] + eps); D[s] = 0; }
  // D_s = Σ_m dÂ[s,m]·w[s,m] / (r_s + eps): with a one-hot w only the members count.
  for (int64_t n = 0; n < N; ++n) D[ib[n]] += Gb[ib[n] * N + n];
  for (int64_t s = 0; s < S; ++s) D[s] *= inv_den[s];
  for (int64_t n = 0; n < N; ++n) {
    m[n] = -std::numeric_limits<acc_t>::infinity(); sum[n] = 0; ydy[n] = 0;
  }
  for (int64_t s = 0; s < S; ++s) {  // z = (A·scale + g)/τ, running max over groups
    acc_t* row = Ab + s * N;
    if (gumbel) gumbel_row(noise, words, seed, static_cast<uint64_t>(b * S + s) * N, N);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t z = (row[n] * scale + (gumbel ? static_cast<acc_t>(noise[n]) : acc_t(0))) * inv_tau;
      row[n] = z;
      m[n] = std::max(m[n], z);
    }
  }
  for (int64_t s = 0; s < S; ++s) exp_sub_accum(Ab + s * N, m, sum, N);
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
  // dv[n] = dout[idx_n] / (count + eps): the transpose of the segmented merge, streamed.
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = ib[n];
    stream_scaled<acc_t>(dvb + n * C, db + s * C, inv_den[s], C);
  }
}

// Hard backward, fused per image: A_b = q_b·k_bᵀ and G_b = dout_b·v_bᵀ into [S,N] scratch,
// the token pass (dA_b, dv_b), then dq_b = dA_b·k_b and dk_b = dA_bᵀ·q_b, so k_b and v_b are
// read from DRAM once per call and every [S,N] matrix lives in cache.
template <typename acc_t>
void hard_backward(const acc_t* q, const acc_t* k, const acc_t* v, const acc_t* dout,
                   int64_t B, int64_t S, int64_t N, int64_t C, acc_t scale, acc_t inv_tau,
                   bool gumbel, uint64_t seed, acc_t eps, const int32_t* idx, const acc_t* cnt,
                   acc_t* dq, acc_t* dk, acc_t* dv) {
  const bool micro = use_micro<acc_t>(S, N);
  const int64_t kv_bytes = N * C * static_cast<int64_t>(sizeof(acc_t));
  at::parallel_for(0, B, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<acc_t> A(S * N), G(S * N), D(S), inv_den(S), m(N), sum(N), ydy(N);
    std::vector<float> noise(gumbel ? N : 0);
    std::vector<uint32_t> words(gumbel ? gumbel_words(N) : 0);
    for (int64_t b = blo; b < bhi; ++b) {
      const acc_t* qb = q + b * S * C;
      const acc_t* kb = k + b * N * C;
      const acc_t* db = dout + b * S * C;
      // small images: fetch v_b during A_b, k_{b+1} during G_b
      const acc_t* vb = v + b * N * C;
      const acc_t* knext = micro && b + 1 < bhi ? k + (b + 1) * N * C : nullptr;
      img_gemm_nt_pf<acc_t>(micro, S, N, C, qb, C, kb, C, A.data(), N, micro ? vb : nullptr,
                            kv_bytes);
      img_gemm_nt_pf<acc_t>(micro, S, N, C, db, C, vb, C, G.data(), N, knext, kv_bytes);
      hard_backward_tokens<acc_t>(A.data(), G.data(), db, b, S, N, C, scale, inv_tau, gumbel,
                                  seed, eps, idx + b * N, cnt + b * S, dv + b * N * C, D.data(),
                                  inv_den.data(), m.data(), sum.data(), ydy.data(), noise.data(),
                                  words.data());
      img_gemm_nn<acc_t>(micro, S, C, N, A.data(), N, kb, C, dq + b * S * C, C);
      img_gemm_tn<acc_t>(micro, N, C, S, A.data(), N, qb, C, dk + b * N * C, C);
    }
    stream_fence();
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
  // The raw logits as a tensor only where they are returned (the soft map) or the soft
  // assignment needs them whole; the hard path computes them per image.
  at::Tensor A;
  if (!hard || return_attn) A = hard ? at::empty({B, S, N}, q.options()) : logits(q, k);
  auto idx = at::empty({B, N}, q.options().dtype(at::kInt));
  auto cnt = at::empty({B, S}, q.options());
  at::Tensor out, hard_map, soft_map;
  AT_DISPATCH_FLOATING_TYPES(acc, "gvf_cpu_forward", [&] {
    using acc_t = scalar_t;
    if (hard) {
      out = empty_output({B, S, C}, q.options());
      hard_forward<acc_t>(q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), v.data_ptr<acc_t>(), B, S,
                          N, C, static_cast<acc_t>(scale), gumbel, useed,
                          static_cast<acc_t>(eps), idx.data_ptr<int32_t>(),
                          cnt.data_ptr<acc_t>(), out.data_ptr<acc_t>(),
                          return_attn ? A.data_ptr<acc_t>() : nullptr);
      if (return_attn) {
        soft_map = at::softmax(A * scale, 1).to(in_dtype);
        hard_map = at::zeros({B, S, N}, q.options().dtype(in_dtype));
        hard_map.scatter_(1, idx.to(at::kLong).unsqueeze(1), 1.0);
      }
    } else {
      const at::Tensor A_raw = return_attn ? A.clone() : at::Tensor();
      noisy_logits_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N, static_cast<acc_t>(scale),
                                  static_cast<acc_t>(1.0 / tau), gumbel, useed);
      softmax_over_groups_inplace<acc_t>(A.data_ptr<acc_t>(), B, S, N);  // A := y
      idx.copy_(A.argmax(1));
      cnt.copy_(A.sum(2));
      auto normed = A / (cnt.unsqueeze(2) + eps);
      out = at::bmm(normed, v);
      if (return_attn) {
        soft_map = at::softmax(A_raw * scale, 1).to(in_dtype);
        hard_map = A.to(in_dtype);
      }
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
  at::Tensor dq, dk, dv;
  AT_DISPATCH_FLOATING_TYPES(acc, "gvf_cpu_backward", [&] {
    using acc_t = scalar_t;
    if (hard) {
      dq = empty_output({B, S, C}, q.options());
      dk = empty_output({B, N, C}, q.options());
      dv = empty_output({B, N, C}, q.options());
      hard_backward<acc_t>(q.data_ptr<acc_t>(), k.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
                           dout.data_ptr<acc_t>(), B, S, N, C, static_cast<acc_t>(scale),
                           static_cast<acc_t>(1.0 / tau), gumbel, useed,
                           static_cast<acc_t>(eps), idx.data_ptr<int32_t>(),
                           cnt.data_ptr<acc_t>(), dq.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
                           dv.data_ptr<acc_t>());
    } else {
      auto A = logits(q, k);
      auto G = at::bmm(dout, v.transpose(1, 2)).contiguous();  // dÂ [B,S,N]
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
      dq = at::bmm(A, k);                    // [B,S,N] @ [B,N,C]
      dk = at::bmm(A.transpose(1, 2), q);    // [B,N,S] @ [B,S,C]
    }
  });
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
