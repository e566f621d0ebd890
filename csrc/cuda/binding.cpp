// Torch binding of the CUDA cross-entropy kernels: the `fusedls_cuda` operator library,
// compiled just in time on a GPU machine and loaded by fusedls/cuda. The kernels themselves
// (cross_entropy.cu) need only the CUDA runtime; this file adds torch's tensors, device guard
// and current stream.
//
//   torch.ops.fusedls_cuda.cross_entropy_forward / cross_entropy_backward /
//   cross_entropy_scale_grad_   (schemas and contract: csrc/common/torch_binding.h)
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/torch_binding.h"
#include "cross_entropy.cuh"

namespace fusedls {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusedls cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

struct Cuda {
  static constexpr bool kCheckTargets = false;  // out-of-range ids give NaN rows: no host sync
  static void check(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda(), "the cuda backend runs on CUDA tensors; ", name, " is on ", t.device());
  }
  static c10::cuda::CUDAGuard guard(const at::Tensor& t) { return c10::cuda::CUDAGuard(t.device()); }
  static void fresh_buffer(const at::Tensor&) {}
  static void forward(const CrossEntropyArgs& a) { launch(fusedls_cross_entropy_forward_cuda, a, "forward"); }
  static void backward(const CrossEntropyArgs& a) { launch(fusedls_cross_entropy_backward_cuda, a, "backward"); }
  static void scale_grad(const CrossEntropyArgs& a) { launch(fusedls_cross_entropy_scale_grad_cuda, a, "scale"); }

  template <typename F>
  static void launch(F launcher, const CrossEntropyArgs& a, const char* what) {
    // The launch goes to the current stream of the tensors' device (made current by guard()).
    check_launch(launcher(&a, c10::cuda::getCurrentCUDAStream().stream()), what);
  }
};

}  // namespace
}  // namespace fusedls

TORCH_LIBRARY(fusedls_cuda, m) {
  m.def(fusedls::kForwardSchema, &fusedls::run_forward<fusedls::Cuda>);
  m.def(fusedls::kBackwardSchema, &fusedls::run_backward<fusedls::Cuda>);
  m.def(fusedls::kScaleGradSchema, &fusedls::run_scale_grad<fusedls::Cuda>);
}
