// Python binding of the native grouping kernels: groupvit_fast._C.
// The CPU kernel is always built; the CUDA entry points exist only in a CUDAExtension build
// (GROUPVIT_FAST_WITH_CUDA), and `has_cuda()` tells Python which one it got.
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> gvf_cpu_forward(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, double scale, bool gumbel,
                                        double tau, double eps, int64_t seed, bool hard,
                                        bool return_attn);
std::vector<at::Tensor> gvf_cpu_backward(const at::Tensor& dout, const at::Tensor& q,
                                         const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& idx, const at::Tensor& cnt,
                                         double scale, bool gumbel, double tau, double eps,
                                         int64_t seed, bool hard);
at::Tensor gvf_gumbel_noise(int64_t B, int64_t S, int64_t N, int64_t seed);

#ifdef GROUPVIT_FAST_WITH_CUDA
std::vector<at::Tensor> gvf_cuda_forward(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, double scale, bool gumbel,
                                         double tau, double eps, int64_t seed,
                                         bool return_attn);
std::vector<at::Tensor> gvf_cuda_backward(const at::Tensor& dout, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& idx, const at::Tensor& cnt,
                                          double scale, bool gumbel, double tau, double eps,
                                          int64_t seed);
#endif

static bool has_cuda() {
#ifdef GROUPVIT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "groupvit_fast native grouping kernels (C++/OpenMP CPU, optional CUDA)";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_forward", &gvf_cpu_forward, "fused grouping forward (CPU)");
  m.def("cpu_backward", &gvf_cpu_backward, "fused grouping backward (CPU)");
  m.def("gumbel_noise", &gvf_gumbel_noise, "the kernels' Philox Gumbel noise for [B,S,N]");
#ifdef GROUPVIT_FAST_WITH_CUDA
  m.def("cuda_forward", &gvf_cuda_forward, "fused grouping forward (CUDA, hard only)");
  m.def("cuda_backward", &gvf_cuda_backward, "fused grouping backward (CUDA, hard only)");
#endif
}
