// CUDA kernels of the fused grouping op; see grouping_kernels.h. The per-element math (Philox
// Gumbel noise, tempered logits, normalisation and softmax gradients) comes from
// grouping_common.h, shared with the C++ CPU kernel (which swaps in vectorisable log/exp
// polynomials), so both backends draw the same Philox stream and compute the same formulas.
//
// Per-token kernels run one thread per (b, n): consecutive threads read consecutive n of each
// [S] column of the [B,S,N] logits, so every load is coalesced, and the S values of a token
// stay in L1 between the passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "grouping_common.h"
#include "grouping_kernels.h"

namespace gvf_cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__global__ void assign_fwd_kernel(const float* __restrict__ A, int B, int S, int N, float scale,
                                  bool gumbel, uint64_t seed, int32_t* __restrict__ idx,
                                  float* __restrict__ soft) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * N) return;
  const int64_t b = i / N, n = i % N;
  const float* col = A + b * S * N + n;
  float best = -INFINITY;
  int bi = 0;
  for (int s = 0; s < S; ++s) {
    const uint64_t off = static_cast<uint64_t>((b * S + s) * N + n);
    const float z = gvf::assign_logit<float>(col[static_cast<int64_t>(s) * N], scale, 1.0f,
                                             gumbel, seed, off);
    if (z > best) { best = z; bi = s; }  // first maximum, like torch.argmax
  }
  idx[i] = bi;
  if (soft != nullptr) {
    float m = -INFINITY, sum = 0.f;
    for (int s = 0; s < S; ++s) m = fmaxf(m, col[static_cast<int64_t>(s) * N] * scale);
    for (int s = 0; s < S; ++s) sum += expf(col[static_cast<int64_t>(s) * N] * scale - m);
    const float inv = 1.f / sum;
    float* out = soft + b * S * N + n;
    for (int s = 0; s < S; ++s)
      out[static_cast<int64_t>(s) * N] = expf(col[static_cast<int64_t>(s) * N] * scale - m) * inv;
  }
}

// One block per (b, s): members are found by scanning idx[b,:] (a broadcast read per warp).
template <typename T>
__global__ void merge_fwd_kernel(const T* __restrict__ v, const int32_t* __restrict__ idx, int S,
                                 int N, int C, float eps, T* __restrict__ out,
                                 float* __restrict__ cnt) {
  const int64_t b = blockIdx.y;
  const int s = blockIdx.x;
  const int32_t* ib = idx + b * N;
  float count = 0.f;
  for (int n = 0; n < N; ++n) count += (ib[n] == s) ? 1.f : 0.f;
  const float inv = 1.f / (count + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.f;
    for (int n = 0; n < N; ++n)
      if (ib[n] == s) acc += to_f(v[(b * N + n) * C + c]);
    out[(b * S + s) * C + c] = from_f<T>(acc * inv);
  }
  if (threadIdx.x == 0) cnt[b * S + s] = count;
}

// One block per (b, n).
template <typename T>
__global__ void bwd_dv_kernel(const T* __restrict__ dout, const T* __restrict__ v,
                              const int32_t* __restrict__ idx, const float* __restrict__ cnt,
                              int S, int N, int C, float eps, T* __restrict__ dv,
                              float* __restrict__ t) {
  __shared__ float red[kThreads];
  const int64_t b = blockIdx.y, n = blockIdx.x;
  const int s = idx[b * N + n];
  const float inv = 1.f / (cnt[b * S + s] + eps);
  const T* dr = dout + (b * S + s) * C;
  const T* vr = v + (b * N + n) * C;
  T* o = dv + (b * N + n) * C;
  float part = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float g = to_f(dr[c]);
    o[c] = from_f<T>(g * inv);
    part += g * to_f(vr[c]);
  }
  red[threadIdx.x] = part;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) t[b * N + n] = red[0] * inv;
}

__global__ void bwd_groupsum_kernel(const int32_t* __restrict__ idx, const float* __restrict__ t,
                                    int B, int S, int N, float* __restrict__ D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * S) return;
  const int64_t b = i / S;
  const int s = static_cast<int>(i % S);
  float acc = 0.f;
  for (int n = 0; n < N; ++n) acc += (idx[b * N + n] == s) ? t[b * N + n] : 0.f;
  D[i] = acc;
}

__global__ void bwd_tokens_kernel(float* __restrict__ A, float* __restrict__ G,
                                  const float* __restrict__ cnt, const float* __restrict__ D,
                                  int B, int S, int N, float scale, float inv_tau, float eps,
                                  bool gumbel, uint64_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * N) return;
  const int64_t b = i / N, n = i % N;
  float* a = A + b * S * N + n;
  float* g = G + b * S * N + n;
  const float* cb = cnt + b * S;
  const float* db = D + b * S;
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) {
    const int64_t o = static_cast<int64_t>(s) * N;
    const float z = gvf::assign_logit<float>(a[o], scale, inv_tau, gumbel, seed,
                                             static_cast<uint64_t>((b * S + s) * N + n));
    a[o] = z;
    m = fmaxf(m, z);
  }
  float sum = 0.f;
  for (int s = 0; s < S; ++s) {
    const int64_t o = static_cast<int64_t>(s) * N;
    const float e = expf(a[o] - m);
    a[o] = e;
    sum += e;
  }
  const float inv_sum = 1.f / sum;
  float ydy = 0.f;
  for (int s = 0; s < S; ++s) {
    const int64_t o = static_cast<int64_t>(s) * N;
    const float y = a[o] * inv_sum;
    const float dy = gvf::norm_grad<float>(g[o], db[s], 1.f / (cb[s] + eps));
    a[o] = y;
    g[o] = dy;
    ydy += y * dy;
  }
  const float sot = scale * inv_tau;
  for (int s = 0; s < S; ++s) {
    const int64_t o = static_cast<int64_t>(s) * N;
    a[o] = gvf::softmax_grad<float>(a[o], g[o], ydy, sot);
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t assign_fwd(const float* A, int B, int S, int N, float scale, bool gumbel,
                       uint64_t seed, int32_t* idx, float* soft, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(B) * N;
  if (total == 0) return cudaSuccess;
  assign_fwd_kernel<<<blocks_for(total), kThreads, 0, stream>>>(A, B, S, N, scale, gumbel, seed,
                                                                 idx, soft);
  return cudaGetLastError();
}

template <typename T>
cudaError_t merge_fwd(const T* v, const int32_t* idx, int B, int S, int N, int C, float eps,
                      T* out, float* cnt, cudaStream_t stream) {
  if (B == 0 || S == 0) return cudaSuccess;
  merge_fwd_kernel<T><<<dim3(S, B), kThreads, 0, stream>>>(v, idx, S, N, C, eps, out, cnt);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_dv(const T* dout, const T* v, const int32_t* idx, const float* cnt, int B, int S,
                   int N, int C, float eps, T* dv, float* t, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  bwd_dv_kernel<T><<<dim3(N, B), kThreads, 0, stream>>>(dout, v, idx, cnt, S, N, C, eps, dv, t);
  return cudaGetLastError();
}

cudaError_t bwd_groupsum(const int32_t* idx, const float* t, int B, int S, int N, float* D,
                         cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(B) * S;
  if (total == 0) return cudaSuccess;
  bwd_groupsum_kernel<<<blocks_for(total), kThreads, 0, stream>>>(idx, t, B, S, N, D);
  return cudaGetLastError();
}

cudaError_t bwd_tokens(float* A, float* G, const float* cnt, const float* D, int B, int S, int N,
                       float scale, float inv_tau, float eps, bool gumbel, uint64_t seed,
                       cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(B) * N;
  if (total == 0) return cudaSuccess;
  bwd_tokens_kernel<<<blocks_for(total), kThreads, 0, stream>>>(A, G, cnt, D, B, S, N, scale,
                                                                 inv_tau, eps, gumbel, seed);
  return cudaGetLastError();
}

#define GVF_INSTANTIATE(T)                                                                     \
  template cudaError_t merge_fwd<T>(const T*, const int32_t*, int, int, int, int, float, T*,  \
                                    float*, cudaStream_t);                                    \
  template cudaError_t bwd_dv<T>(const T*, const T*, const int32_t*, const float*, int, int,  \
                                 int, int, float, T*, float*, cudaStream_t);
GVF_INSTANTIATE(float)
GVF_INSTANTIATE(__half)
GVF_INSTANTIATE(__nv_bfloat16)
#undef GVF_INSTANTIATE

}  // namespace gvf_cuda
