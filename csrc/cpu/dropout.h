// CPU dropout kernels (csrc/cpu/dropout.cpp): dropout, dropout + residual add, and dropout + add
// + RMSNorm / LayerNorm, forward and backward, compiled once per library variant like
// cross_entropy.h. Called by the `fusedls_cpp` binding (binding.cpp); the contract is
// fusedls/backend/protocols.py's DropoutBackend, with the mask drawn as the Triton kernels draw it.
//
// Every tensor is rows (contiguous; dropout_forward takes any shape, rows being its last
// dimension, the norms (R, N)) or an (N,) vector of one dtype T (fp32, bf16 or fp16:
// fusedls/backend/cpp/dropout.py sends other mixes to the eager backend); the row statistics are
// fp32. `seed` is the int64 Philox seed (a CPU tensor), `threshold` the drop threshold t
// (kept iff the element's 16-bit draw >= t), `scale` 1 / (1 - p) (0 when p == 1).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedls {
namespace cpu {

// out = residual + (x + bias) * m; `out` may be `x` itself.
void dropout_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, const at::Tensor& seed, int64_t threshold,
                     double scale, const at::Tensor& out);

// h = residual + x * m (no dropout without a seed), y = norm(h) * weight + bias (weight absent:
// 1, bias absent: 0); mean (LayerNorm only) and rstd per row.
void dropout_add_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& seed, int64_t threshold, double scale, double eps,
                              bool is_rms, const at::Tensor& y, const at::Tensor& h, const at::Tensor& mean,
                              const at::Tensor& rstd);

// dx, dresidual (when given), and the fp32 (N,) sums dweight, dbias (when given), summed over
// fixed blocks of rows in block order: the same bits whatever the thread count.
void dropout_add_norm_backward(const at::Tensor& dy, const std::optional<at::Tensor>& dh_next, const at::Tensor& h,
                               const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::optional<at::Tensor>& seed, int64_t threshold,
                               double scale, bool is_rms, const at::Tensor& dx,
                               const std::optional<at::Tensor>& dresidual, const std::optional<at::Tensor>& dweight,
                               const std::optional<at::Tensor>& dbias);

}  // namespace cpu
}  // namespace fusedls
