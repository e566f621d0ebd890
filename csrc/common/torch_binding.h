// The torch side of the native cross-entropy ops, shared by the CPU and the CUDA binding
// (csrc/cpu/binding.cpp, csrc/cuda/binding.cpp): filling CrossEntropyArgs from tensors,
// allocating the outputs, and the op schemas. A binding supplies a policy `B` with
//   static void check(const at::Tensor&, const char* name);   // right device
//   static auto guard(const at::Tensor&);                     // RAII: that tensor's device current
//   static void fresh_buffer(const at::Tensor&);              // before the first write of a new grad
//   static void forward(const CrossEntropyArgs&);  backward(...);  scale_grad(...);
//   static constexpr bool kCheckTargets;   // raise ValueError on an out-of-range class id (CPU:
//                                         // free; a GPU binding instead gets NaN rows, no sync)
// and registers run_forward<B>, run_backward<B>, run_scale_grad<B> under the schemas below.
//
// The bindings receive what fusedls/ops/cross_entropy.py passes to every backend (see
// fusedls/eager/cross_entropy.py): (R, C) logits whose classes are contiguous, (R,) class ids
// of an integer dtype or (R, C) probabilities, fp32 (C,) weights. What the kernels do not take
// directly is converted here (int32 ids to int64, probabilities of another dtype than the
// logits' or fp32 to fp32), never the logits.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <optional>
#include <tuple>

#include "cross_entropy_args.h"

namespace fusedls {

inline Dtype dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16 here, got ", t.scalar_type());
  }
}

inline void check_rows(const at::Tensor& t, int64_t n_rows, int64_t n_cols, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n_rows && t.size(1) == n_cols, name, " must have shape (", n_rows, ", ",
              n_cols, "), got ", t.sizes());
  TORCH_CHECK(n_cols <= 1 || t.stride(1) == 1, name, " must have contiguous classes (stride 1), got strides ",
              t.strides());
}

// The tensors the arguments point into (kept alive by the caller) and the arguments.
struct Prepared {
  at::Tensor target;  // int64 ids, or probabilities of the logits' dtype or fp32
  at::Tensor weight;  // fp32 contiguous, or undefined
  CrossEntropyArgs args;
};

inline Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        int64_t ignore_index, double keep, double spread, int64_t block_c) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D (R, C), got ", logits.sizes());
  Prepared p;
  CrossEntropyArgs& a = p.args;
  a.n_rows = logits.size(0);
  a.n_cols = logits.size(1);
  check_rows(logits, a.n_rows, a.n_cols, "logits");
  a.dtype = dtype_of(logits, "logits");
  a.logits = logits.data_ptr();
  a.stride_logits = logits.stride(0);
  if (target.is_floating_point()) {
    p.target = target;
    if (target.scalar_type() != logits.scalar_type() && target.scalar_type() != at::kFloat) {
      p.target = target.to(at::kFloat);
    }
    check_rows(p.target, a.n_rows, a.n_cols, "probability target");
    a.prob_target = true;
    a.target_dtype = dtype_of(p.target, "probability target");
    a.stride_target = p.target.stride(0);
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == a.n_rows, "class-id target must have shape (", a.n_rows,
                ",), got ", target.sizes());
    p.target = target.to(at::kLong);
    a.stride_target = p.target.stride(0);
  }
  a.target = p.target.data_ptr();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == a.n_cols, "weight must have ", a.n_cols, " elements, got ", weight->numel());
    p.weight = weight->to(at::kFloat).contiguous();
    a.weight = p.weight.data_ptr<float>();
  }
  a.ignore_index = ignore_index;
  a.keep = static_cast<float>(keep);
  a.spread = static_cast<float>(spread);
  a.block_c = block_c;
  return p;
}

// ValueError (Python's) naming the first class id outside [0, C) that is not ignore_index, as
// fusedls's eager backend raises on CPU tensors; one pass over the R ids (host memory).
inline void check_class_ids(const Prepared& p) {
  const CrossEntropyArgs& a = p.args;
  if (a.prob_target) return;
  const int64_t* ids = p.target.data_ptr<int64_t>();
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const int64_t y = ids[r * a.stride_target];
    TORCH_CHECK_VALUE(y == a.ignore_index || (y >= 0 && y < a.n_cols), "target contains class id ", y,
                      ", outside [0, ", a.n_cols, ") and not ignore_index=", a.ignore_index);
  }
}

// A per-row factor: fp32, 0-dim (broadcast, stride 0) or (R,) with any stride.
inline at::Tensor row_factor(const at::Tensor& factor, int64_t n_rows, int64_t& stride, const char* name) {
  TORCH_CHECK(factor.dim() == 0 || (factor.dim() == 1 && factor.size(0) == n_rows), name,
              " must be 0-dim or have shape (", n_rows, ",), got ", factor.sizes());
  at::Tensor f = factor.to(at::kFloat);
  stride = f.dim() == 0 ? 0 : f.stride(0);
  return f;
}

// Op schemas (torch.ops.<namespace>.<name>). block_c: classes per chunk of a row sweep, 0 for
// the kernels' default. Same contract as fusedls/eager/cross_entropy.py.
constexpr const char* kForwardSchema =
    "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, Tensor(a!)? grad, Tensor? grad_scale, "
    "int ignore_index, float keep, float spread, int block_c) -> (Tensor, Tensor, Tensor)";
constexpr const char* kBackwardSchema =
    "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
    "Tensor coef, Tensor(a!) grad, Tensor(b!)? grad_target, int ignore_index, float keep, float spread, "
    "int block_c) -> ()";
constexpr const char* kScaleGradSchema = "cross_entropy_scale_grad_(Tensor(a!) grad, Tensor factor) -> ()";

// (loss, lse, coef) per row; writes grad_scale * dl/dlogits into grad when given (grad may be
// the logits themselves).
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(const at::Tensor& logits, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& grad,
                                                           const std::optional<at::Tensor>& grad_scale,
                                                           int64_t ignore_index, double keep, double spread,
                                                           int64_t block_c) {
  B::check(logits, "logits");
  B::check(target, "target");
  const auto guard = B::guard(logits);
  Prepared p = prepare(logits, target, weight, ignore_index, keep, spread, block_c);
  if constexpr (B::kCheckTargets) check_class_ids(p);
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
    if (a.grad != a.logits) B::fresh_buffer(*grad);
  }
  B::forward(a);
  return {loss, lse, coef};
}

// dL/dlogits into grad (and dL/dtarget into grad_target when given) from the saved statistics;
// grad_loss is each row's factor, 0-dim (broadcast) or (R,).
template <typename B>
void run_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& coef,
                  const at::Tensor& grad, const std::optional<at::Tensor>& grad_target, int64_t ignore_index,
                  double keep, double spread, int64_t block_c) {
  B::check(logits, "logits");
  B::check(grad, "grad");
  const auto guard = B::guard(logits);
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
  B::fresh_buffer(grad);
  at::Tensor gt;  // where the kernel writes dL/dtarget: grad_target itself, or a stand-in
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
  B::backward(a);
  if (target_grad && !gt.is_same(*grad_target)) grad_target->copy_(gt);
}

// grad *= factor row by row (rows whose factor is 1 untouched).
template <typename B>
void run_scale_grad(const at::Tensor& grad, const at::Tensor& factor) {
  B::check(grad, "grad");
  const auto guard = B::guard(grad);
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
  B::scale_grad(a);
}

}  // namespace fusedls
