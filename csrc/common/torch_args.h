// Filling CrossEntropyArgs from torch tensors: shared by the CPU and the CUDA binding
// (csrc/cpu/binding.cpp, csrc/cuda/binding.cpp), which differ only in the kernels they call.
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

// A per-row factor: fp32, 0-dim (broadcast, stride 0) or (R,) with any stride.
inline at::Tensor row_factor(const at::Tensor& factor, int64_t n_rows, int64_t& stride, const char* name) {
  TORCH_CHECK(factor.dim() == 0 || (factor.dim() == 1 && factor.size(0) == n_rows), name,
              " must be 0-dim or have shape (", n_rows, ",), got ", factor.sizes());
  at::Tensor f = factor.to(at::kFloat);
  stride = f.dim() == 0 ? 0 : f.stride(0);
  return f;
}

}  // namespace fusedls
