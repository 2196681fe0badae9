// Torch binding of the CUDA grouping kernels (compiled only in a CUDAExtension build, where
// setup.py defines GROUPVIT_FAST_WITH_CUDA). The dense products run on cuBLAS in fp32; the raw
// kernels in grouping_kernels.cu do the per-token / per-group work between them.
#ifdef GROUPVIT_FAST_WITH_CUDA
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

#include "grouping_kernels.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "groupvit_fast CUDA kernel ", what, " failed: ",
              cudaGetErrorString(err));
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(),
              "gvf_cuda: expected CUDA tensors for q, k, v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == k.size(0) &&
                  k.sizes() == v.sizes() && q.size(2) == k.size(2),
              "gvf_cuda: expected q [B,S,C], k and v [B,N,C]; got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "gvf_cuda: q, k, v must share a dtype");
}

template <typename F>
void dispatch_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "gvf_cuda: unsupported dtype ", t, " (fp32, fp16, bf16)");
  }
}

}  // namespace

std::vector<at::Tensor> gvf_cuda_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                         const at::Tensor& v_in, double scale, bool gumbel,
                                         double tau, double eps, int64_t seed,
                                         bool return_attn) {
  check(q_in, k_in, v_in);
  TORCH_CHECK(tau > 0, "gumbel_assign_merge: tau must be > 0, got ", tau);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), S = q.size(1), C = q.size(2), N = k.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto A = at::bmm(q.to(at::kFloat), k.to(at::kFloat).transpose(1, 2)).contiguous();  // [B,S,N]
  auto f32 = q.options().dtype(at::kFloat);
  auto idx = at::empty({B, N}, q.options().dtype(at::kInt));
  auto cnt = at::empty({B, S}, f32);
  auto out = at::empty({B, S, C}, q.options());
  at::Tensor soft = return_attn ? at::empty({B, S, N}, f32) : at::Tensor();
  check_cuda(gvf_cuda::assign_fwd(A.data_ptr<float>(), B, S, N, static_cast<float>(scale),
                                  gumbel, static_cast<uint64_t>(seed), idx.data_ptr<int32_t>(),
                                  return_attn ? soft.data_ptr<float>() : nullptr, stream),
             "assign_fwd");
  dispatch_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_cuda(gvf_cuda::merge_fwd<T>(reinterpret_cast<const T*>(v.data_ptr()),
                                      idx.data_ptr<int32_t>(), B, S, N, C,
                                      static_cast<float>(eps),
                                      reinterpret_cast<T*>(out.data_ptr()),
                                      cnt.data_ptr<float>(), stream),
               "merge_fwd");
  });
  at::Tensor hard_map, soft_map;
  if (return_attn) {
    hard_map = at::zeros({B, S, N}, q.options());
    hard_map.scatter_(1, idx.to(at::kLong).unsqueeze(1), 1.0);
    soft_map = soft.to(q.scalar_type());
  } else {
    hard_map = at::empty({0}, q.options());
    soft_map = at::empty({0}, q.options());
  }
  return {out, idx, cnt, hard_map, soft_map};
}

std::vector<at::Tensor> gvf_cuda_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                          const at::Tensor& k_in, const at::Tensor& v_in,
                                          const at::Tensor& idx_in, const at::Tensor& cnt_in,
                                          double scale, bool gumbel, double tau, double eps,
                                          int64_t seed) {
  check(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto dout = dout_in.to(q.scalar_type()).contiguous();
  auto idx = idx_in.to(at::kInt).contiguous();
  auto cnt = cnt_in.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), S = q.size(1), C = q.size(2), N = k.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto qf = q.to(at::kFloat), kf = k.to(at::kFloat), vf = v.to(at::kFloat);
  auto A = at::bmm(qf, kf.transpose(1, 2)).contiguous();                    // [B,S,N]
  auto G = at::bmm(dout.to(at::kFloat), vf.transpose(1, 2)).contiguous();   // dÂ [B,S,N]
  auto f32 = q.options().dtype(at::kFloat);
  auto t = at::empty({B, N}, f32);
  auto D = at::empty({B, S}, f32);
  auto dv = at::empty_like(v);
  dispatch_storage(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_cuda(gvf_cuda::bwd_dv<T>(reinterpret_cast<const T*>(dout.data_ptr()),
                                   reinterpret_cast<const T*>(v.data_ptr()),
                                   idx.data_ptr<int32_t>(), cnt.data_ptr<float>(), B, S, N, C,
                                   static_cast<float>(eps), reinterpret_cast<T*>(dv.data_ptr()),
                                   t.data_ptr<float>(), stream),
               "bwd_dv");
  });
  check_cuda(gvf_cuda::bwd_groupsum(idx.data_ptr<int32_t>(), t.data_ptr<float>(), B, S, N,
                                    D.data_ptr<float>(), stream),
             "bwd_groupsum");
  const double inv_tau = gumbel ? 1.0 / tau : 1.0;  // eval hard_softmax has no temperature
  check_cuda(gvf_cuda::bwd_tokens(A.data_ptr<float>(), G.data_ptr<float>(), cnt.data_ptr<float>(),
                                  D.data_ptr<float>(), B, S, N, static_cast<float>(scale),
                                  static_cast<float>(inv_tau), static_cast<float>(eps), gumbel,
                                  static_cast<uint64_t>(seed), stream),
             "bwd_tokens");
  auto dq = at::bmm(A, kf).to(q.scalar_type());                  // [B,S,N] @ [B,N,C]
  auto dk = at::bmm(A.transpose(1, 2), qf).to(q.scalar_type());  // [B,N,S] @ [B,S,C]
  return {dq, dk, dv};
}
#endif  // GROUPVIT_FAST_WITH_CUDA
