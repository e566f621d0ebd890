// Torch binding of the CPU cross-entropy kernels: the `fusedls_cpp` operator library, loaded
// by fusedls/cpp (torch.ops.load_library). Each instruction-set variant of the library
// (fusedls/cpp/_build.py) registers the same ops; one variant is loaded per process.
//
//   torch.ops.fusedls_cpp.cross_entropy_forward / cross_entropy_backward /
//   cross_entropy_scale_grad_   (schemas and contract: csrc/common/torch_binding.h)
//   torch.ops.fusedls_cpp.vector_norm_forward / vector_norm_backward   (contract: vector_norm.h)
//   torch.ops.fusedls_cpp.foreach_norms / foreach_scale_ / foreach_penalty_backward
//                                                     (contract: foreach_norm.h)
//   torch.ops.fusedls_cpp.dropout_forward / dropout_add_norm_forward / dropout_add_norm_backward
//                                                     (contract: dropout.h)
//   torch.ops.fusedls_cpp.capability() -> str      "DEFAULT", "AVX2" or "AVX512"
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/torch_binding.h"
#include "cross_entropy.h"
#include "dropout.h"
#include "foreach_norm.h"
#include "vector_norm.h"

namespace fusedls {
namespace {

// A freshly allocated gradient is untouched memory: its first write faults in every 4 KB page
// (the kernel zeroes each), which on large logits costs more than the loss itself. The kernels'
// threads each first-touch their own rows, so the faults are taken in parallel.
// FUSEDLS_HUGE_PAGES=1 also advises transparent huge pages for the buffer (Linux, THP mode
// "madvise" or "always"): one fault per 2 MB, faster when the kernel has huge pages at hand, but
// calls stall when it must compact memory for them, so it is off by default (measured figures:
// benchmarks/results/cpu-amd-epyc/README.md). Only whole 2 MB pages inside the buffer are advised.
void advise_huge_pages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDLS_HUGE_PAGES");
    return v != nullptr && std::string(v) == "1";
  }();
  if (!enabled) return;
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(buffer.numel()) * buffer.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)buffer;
#endif
}

struct Cpu {
  static void check(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "the cpp backend runs on CPU tensors; ", name, " is on ", t.device());
  }
  static constexpr bool kCheckTargets = true;
  static int guard(const at::Tensor&) { return 0; }  // one device: nothing to switch
  static void fresh_buffer(const at::Tensor& t) { advise_huge_pages(t); }
  static void forward(const CrossEntropyArgs& a) { cpu::cross_entropy_forward(a); }
  static void backward(const CrossEntropyArgs& a) { cpu::cross_entropy_backward(a); }
  static void scale_grad(const CrossEntropyArgs& a) { cpu::cross_entropy_scale_grad(a); }
};

std::string capability() { return cpu::capability(); }

}  // namespace
}  // namespace fusedls

TORCH_LIBRARY(fusedls_cpp, m) {
  m.def(fusedls::kForwardSchema, &fusedls::run_forward<fusedls::Cpu>);
  m.def(fusedls::kBackwardSchema, &fusedls::run_backward<fusedls::Cpu>);
  m.def(fusedls::kScaleGradSchema, &fusedls::run_scale_grad<fusedls::Cpu>);
  m.def("vector_norm_forward(Tensor rows, float ord, Tensor(a!) norm, Tensor(b!) count) -> ()",
        &fusedls::cpu::vector_norm_forward);
  m.def("vector_norm_backward(Tensor grad, Tensor rows, Tensor norm, Tensor count, float ord, Tensor(a!) dx) -> ()",
        &fusedls::cpu::vector_norm_backward);
  m.def("dropout_forward(Tensor x, Tensor? bias, Tensor? residual, Tensor seed, int threshold, float scale, "
        "Tensor(a!) out) -> ()",
        &fusedls::cpu::dropout_forward);
  m.def("dropout_add_norm_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? seed, "
        "int threshold, float scale, float eps, bool is_rms, Tensor(a!) y, Tensor(b!) h, Tensor(c!) mean, "
        "Tensor(d!) rstd) -> ()",
        &fusedls::cpu::dropout_add_norm_forward);
  m.def("dropout_add_norm_backward(Tensor dy, Tensor? dh_next, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "Tensor? seed, int threshold, float scale, bool is_rms, Tensor(a!) dx, Tensor(b!)? dresidual, "
        "Tensor(c!)? dweight, Tensor(d!)? dbias) -> ()",
        &fusedls::cpu::dropout_add_norm_backward);
  m.def("foreach_norms(Tensor[] tensors, float ord, int block) -> Tensor", &fusedls::cpu::foreach_norms);
  m.def("foreach_scale_(Tensor(a!)[] tensors, Tensor coef, int block) -> ()", &fusedls::cpu::foreach_scale_);
  m.def("foreach_penalty_backward(Tensor[] tensors, Tensor grad, bool l2, int block) -> Tensor[]",
        &fusedls::cpu::foreach_penalty_backward);
  m.def("capability() -> str", &fusedls::capability);
}
