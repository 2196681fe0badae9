// Raw CUDA kernels of the fused grouping op (no torch dependency, so CMakeLists.txt builds them
// as a standalone library with nvcc, and the torch extension links the same code).
//
// Division of labour with the caller (csrc/grouping_cuda.cpp): the dense products
// A = q·kᵀ, dÂ = dout·vᵀ, dq = dA·k and dk = dAᵀ·q run on cuBLAS in fp32; these kernels do
// everything per token / per group between them. T is float, __half or __nv_bfloat16.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace gvf_cuda {

// idx[b,n] = argmax_s (A[b,s,n]*scale + g); soft (nullable) = softmax_s(A*scale).
cudaError_t assign_fwd(const float* A, int B, int S, int N, float scale, bool gumbel,
                       uint64_t seed, int32_t* idx, float* soft, cudaStream_t stream);

// out[b,s,:] = Σ_{n: idx=s} v[b,n,:] / (cnt + eps); cnt[b,s] = member count.
template <typename T>
cudaError_t merge_fwd(const T* v, const int32_t* idx, int B, int S, int N, int C, float eps,
                      T* out, float* cnt, cudaStream_t stream);

// dv[b,n,:] = dout[b,idx,:] / (cnt + eps);  t[b,n] = dout[b,idx,:]·v[b,n,:] / (cnt + eps).
template <typename T>
cudaError_t bwd_dv(const T* dout, const T* v, const int32_t* idx, const float* cnt, int B, int S,
                   int N, int C, float eps, T* dv, float* t, cudaStream_t stream);

// D[b,s] = Σ_{n: idx=s} t[b,n].
cudaError_t bwd_groupsum(const int32_t* idx, const float* t, int B, int S, int N, float* D,
                         cudaStream_t stream);

// A (raw logits) -> dA_raw in place; G = dout·vᵀ is scratch.
cudaError_t bwd_tokens(float* A, float* G, const float* cnt, const float* D, int B, int S, int N,
                       float scale, float inv_tau, float eps, bool gumbel, uint64_t seed,
                       cudaStream_t stream);

}  // namespace gvf_cuda
