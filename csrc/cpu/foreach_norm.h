// CPU multi-tensor kernels of fusedls.foreach_norm / clip_grad_norm_ / the l1 and l2 penalties
// (csrc/cpu/foreach_norm.cpp), compiled once per library variant like vector_norm.h. Called by
// the `fusedls_cpp` binding (binding.cpp). Tensors: CPU, fp32 / bf16 / fp16 (mixed in a list),
// dense (their numel elements fill consecutive slots from data_ptr, in any dimension order).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fusedls {
namespace cpu {

// (n,) fp64 ord norm of each tensor, ord 1, 2 or inf: fp32 norms of blocks of `block` elements
// (scaled sums, no overflow of squares), merged per tensor in fp64 in block order.
at::Tensor foreach_norms(at::TensorList tensors, double ord, int64_t block);

// t *= coef (a one-element fp32 tensor) for every tensor, in fp32, rounded once to t's dtype.
void foreach_scale_(at::TensorList tensors, const at::Tensor& coef, int64_t block);

// The list of grad * sign(t_i) (l2 false) or grad * 2 t_i (l2 true), in fp32 rounded once, each
// with t_i's dtype, shape and strides. `grad`: a one-element fp32 tensor.
std::vector<at::Tensor> foreach_penalty_backward(at::TensorList tensors, const at::Tensor& grad, bool l2,
                                                 int64_t block);

}  // namespace cpu
}  // namespace fusedls
