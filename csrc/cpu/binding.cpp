// Torch binding of the CPU cross-entropy kernels: the `fusedls_cpp` operator library, loaded
// by fusedls/cpp (torch.ops.load_library). Each instruction-set variant of the library
// (fusedls/cpp/_build.py) registers the same ops; one variant is loaded per process.
//
//   torch.ops.fusedls_cpp.cross_entropy_forward / cross_entropy_backward /
//   cross_entropy_scale_grad_   (schemas and contract: csrc/common/torch_binding.h)
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

namespace fusedls {
namespace {

// A freshly allocated gradient is untouched memory: its first write faults in every 4 KB page
// (the kernel zeroes each), which costs more than the loss itself on large logits. Asking for
// transparent huge pages first (Linux, THP mode "madvise" or "always") makes that one fault per
// 2 MB: measured here (fp32 2048 x 32000, 2 cores) ~100 ms instead of ~330 ms for forward +
// backward. The price: when the kernel has no free huge page at hand it compacts memory, which
// now and then stalls a call (seen: 0.9 s once in ~20 calls on a busy machine);
// FUSEDLS_HUGE_PAGES=0 turns the advice off. Harmless on memory already touched or when THP is
// off; only whole 2 MB pages inside the buffer are advised. The kernels' threads then do the
// first touch of their own rows.
void advise_huge_pages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDLS_HUGE_PAGES");
    return v == nullptr || std::string(v) != "0";
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
  m.def("capability() -> str", &fusedls::capability);
}
