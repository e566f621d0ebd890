// Torch binding of the CPU cross-entropy kernels: the `fusedls_cpp` operator library, loaded
// by fusedls/cpp/cross_entropy.py with torch.ops.load_library. Each instruction-set variant of
// the library (fusedls/cpp/_build.py) registers the same ops; one variant is loaded per process.
//
//   torch.ops.fusedls_cpp.cross_entropy_forward(logits, target, weight, grad, grad_scale,
//       ignore_index, keep, spread, block_c) -> (loss, lse, coef)   grad may be logits (in place)
//   torch.ops.fusedls_cpp.cross_entropy_backward(grad_loss, logits, target, weight, lse, coef,
//       grad, grad_target, ignore_index, keep, spread, block_c) -> ()
// block_c: classes per block of a row sweep (0: the kernels' default; tests make it small).
//   torch.ops.fusedls_cpp.cross_entropy_scale_grad_(grad, factor) -> ()
//   torch.ops.fusedls_cpp.capability() -> str               "DEFAULT", "AVX2" or "AVX512"
//
// Same contract as fusedls/eager/cross_entropy.py (R, C logits with contiguous classes).
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../common/torch_args.h"
#include "cross_entropy.h"

namespace fusedls {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "the cpp backend runs on CPU tensors; ", name, " is on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& grad,
                                                       const std::optional<at::Tensor>& grad_scale,
                                                       int64_t ignore_index, double keep, double spread,
                                                       int64_t block_c) {
  check_cpu(logits, "logits");
  check_cpu(target, "target");
  Prepared p = prepare(logits, target, weight, ignore_index, keep, spread, block_c);
  CrossEntropyArgs& a = p.args;
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({a.n_rows}, options);
  at::Tensor lse = at::empty({a.n_rows}, options);
  at::Tensor coef = at::empty({a.n_rows}, options);
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.coef = coef.data_ptr<float>();
  at::Tensor scale;
  if (grad.has_value() && grad->defined()) {
    check_rows(*grad, a.n_rows, a.n_cols, "grad");
    TORCH_CHECK(grad->scalar_type() == logits.scalar_type(), "grad must have the logits' dtype");
    TORCH_CHECK(grad_scale.has_value() && grad_scale->defined() && grad_scale->numel() == 1,
                "grad_scale (one element) is required with grad");
    scale = grad_scale->to(at::kFloat).reshape({});
    a.grad = grad->data_ptr();
    a.stride_grad = grad->stride(0);
    a.scale = scale.data_ptr<float>();
  }
  cpu::cross_entropy_forward(a);
  return {loss, lse, coef};
}

void backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& coef,
              const at::Tensor& grad, const std::optional<at::Tensor>& grad_target, int64_t ignore_index,
              double keep, double spread, int64_t block_c) {
  check_cpu(logits, "logits");
  Prepared p = prepare(logits, target, weight, ignore_index, keep, spread, block_c);
  CrossEntropyArgs& a = p.args;
  check_rows(grad, a.n_rows, a.n_cols, "grad");
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), "grad must have the logits' dtype");
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  const at::Tensor coef32 = coef.to(at::kFloat).contiguous();
  const at::Tensor factor = row_factor(grad_loss, a.n_rows, a.stride_scale, "grad_loss");
  a.lse = const_cast<float*>(lse32.data_ptr<float>());
  a.coef = const_cast<float*>(coef32.data_ptr<float>());
  a.scale = factor.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.stride_grad = grad.stride(0);
  at::Tensor gt;  // where the kernel writes dL/dtarget: grad_target, or an fp32 stand-in
  const bool target_grad = grad_target.has_value() && grad_target->defined();
  if (target_grad) {
    TORCH_CHECK(a.prob_target, "grad_target needs probability targets");
    const bool direct = grad_target->scalar_type() == p.target.scalar_type() &&
                        (a.n_cols <= 1 || grad_target->stride(1) == 1);
    gt = direct ? *grad_target : at::empty({a.n_rows, a.n_cols}, p.target.options());
    check_rows(gt, a.n_rows, a.n_cols, "grad_target");
    a.grad_target = gt.data_ptr();
    a.stride_grad_target = gt.stride(0);
  }
  cpu::cross_entropy_backward(a);
  if (target_grad && !gt.is_same(*grad_target)) grad_target->copy_(gt);
}

void scale_grad_(const at::Tensor& grad, const at::Tensor& factor) {
  check_cpu(grad, "grad");
  TORCH_CHECK(grad.dim() == 2, "grad must be 2-D (R, C), got ", grad.sizes());
  CrossEntropyArgs a;
  a.n_rows = grad.size(0);
  a.n_cols = grad.size(1);
  check_rows(grad, a.n_rows, a.n_cols, "grad");
  a.dtype = dtype_of(grad, "grad");
  a.grad = grad.data_ptr();
  a.stride_grad = grad.stride(0);
  const at::Tensor f = row_factor(factor, a.n_rows, a.stride_scale, "factor");
  a.scale = f.data_ptr<float>();
  cpu::cross_entropy_scale_grad(a);
}

std::string capability() { return cpu::capability(); }

}  // namespace
}  // namespace fusedls

TORCH_LIBRARY(fusedls_cpp, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, Tensor(a!)? grad, Tensor? grad_scale, "
        "int ignore_index, float keep, float spread, int block_c) -> (Tensor, Tensor, Tensor)",
        &fusedls::forward);
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        "Tensor coef, Tensor(a!) grad, Tensor(b!)? grad_target, int ignore_index, float keep, float spread, int block_c) -> ()",
        &fusedls::backward);
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad, Tensor factor) -> ()", &fusedls::scale_grad_);
  m.def("capability() -> str", &fusedls::capability);
}
