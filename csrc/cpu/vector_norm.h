// CPU vector-norm kernels (csrc/cpu/vector_norm.cpp), ord 1, 2, inf and -inf, compiled once per
// library variant like cross_entropy.h. Called by the `fusedls_cpp` binding (binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedls {
namespace cpu {

// Norm of each row of `rows` (R, N), N >= 1, columns contiguous (any row stride), fp32 / bf16 /
// fp16: into `norm` (R,) fp32; for ord +-inf the number of elements tied at the norm goes into
// `count` (R,) fp32 (unused otherwise).
void vector_norm_forward(const at::Tensor& rows, double ord, const at::Tensor& norm, const at::Tensor& count);

// d(sum_i grad_i norm_i)/d rows into `dx` (R, N, contiguous, rows' dtype); `grad`, `norm`,
// `count` (R,) fp32 contiguous (count: ord +-inf only).
void vector_norm_backward(const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& norm,
                          const at::Tensor& count, double ord, const at::Tensor& dx);

// One thread's ord 1 or 2 norm (the scaled sums above) or max |x| (ord inf, NaN winning) of
// x[0, n) of `dtype` (fp32 / bf16 / fp16); 0 when n == 0. Shared with foreach_norm.cpp.
float span_norm(const void* x, at::ScalarType dtype, int64_t n, double ord);

}  // namespace cpu
}  // namespace fusedls
