// CPU kernels of fusedls.dropout, dropout_add and dropout_add_{rms,layer}_norm. The math is that of
// fusedls/backend/triton/dropout.py (its module docstring derives the norm gradients); here:
//
// Mask: element (r, c) of (R, N) rows takes the 16-bit half c % 2 of word (c % 8) / 2 of
//   Philox-4x32-10 at counter r * ceil(N / 8) + c / 8 under the 64-bit seed, and is kept iff that
//   draw is >= threshold: the bits of the Triton kernels and of the eager backend.
// Values: computed in fp32 and rounded once to T; h is rounded before it is normalised (as the
//   unfused composition normalises the stored h); norm statistics in fp32, two passes over a row.
//
// Rows are split across torch's intra-op threads (at::parallel_for). The backward's weight and
// bias sums go through fixed blocks of kBlockRows rows, each summed by one thread into its own
// partial, then the partials in block order: deterministic, whatever the thread count.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fusedls {
namespace cpu {
namespace {

constexpr int64_t kElementsGrain = 16384;  // elements below which a call stays on one thread
constexpr int64_t kBlockRows = 32;         // rows per partial of the backward's weight / bias sums
constexpr int64_t kGroup = 8;              // elements per Philox counter

int64_t grain(int64_t n_cols) { return std::max<int64_t>(1, kElementsGrain / std::max<int64_t>(1, n_cols)); }

// Philox-4x32-10 of counter (lo, hi, 0, 0) under key (seed lo, seed hi): tl.randint4x's words.
inline std::array<uint32_t, 4> philox(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = uint64_t{0xD2511F53u} * c0;
    const uint64_t b = uint64_t{0xCD9E8D57u} * c2;
    c0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// The dropout factor of columns [0, N) of row r: scale where kept, 0 where dropped.
struct RowMask {
  uint64_t seed;
  int64_t groups;  // ceil(N / 8)
  int64_t threshold;
  float scale;

  void factors(int64_t row, int64_t n_cols, float* out) const {
    for (int64_t g = 0; g < groups; ++g) {
      const auto w = philox(static_cast<uint64_t>(row * groups + g), seed);
      const int64_t base = g * kGroup;
      for (int64_t j = 0; j < kGroup && base + j < n_cols; ++j) {
        const uint32_t draw = (w[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
        out[base + j] = static_cast<int64_t>(draw) >= threshold ? scale : 0.f;
      }
    }
  }
};

RowMask row_mask(const std::optional<at::Tensor>& seed, int64_t n_cols, int64_t threshold, double scale) {
  const bool on = seed.has_value() && seed->defined();
  TORCH_CHECK(!on || (seed->numel() == 1 && seed->device().is_cpu()), "seed must be one int64 on the CPU");
  return {on ? static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>()) : 0, (n_cols + kGroup - 1) / kGroup,
          threshold, static_cast<float>(scale)};
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.sizes() == like.sizes() &&
                  t.scalar_type() == like.scalar_type(),
              name, " must be a contiguous CPU tensor of shape ", like.sizes(), " and dtype ", like.scalar_type());
}

void check_optional(const std::optional<at::Tensor>& t, int64_t numel, at::ScalarType dtype, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == numel && t->scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", numel, " elements of ", dtype);
}

template <typename T>
void dropout_rows(const at::Tensor& x, const T* bias, const T* residual, const RowMask& mask, T* out) {
  const int64_t n_cols = x.dim() == 0 ? 1 : x.size(-1), n_rows = n_cols == 0 ? 0 : x.numel() / n_cols;
  const T* xs = x.data_ptr<T>();
  at::parallel_for(0, n_rows, grain(n_cols), [&](int64_t begin, int64_t end) {
    std::vector<float> factor(mask.groups * kGroup);
    for (int64_t r = begin; r < end; ++r) {
      mask.factors(r, n_cols, factor.data());
      const int64_t at = r * n_cols;
      for (int64_t c = 0; c < n_cols; ++c) {
        float v = static_cast<float>(xs[at + c]);
        if (bias != nullptr) v += static_cast<float>(bias[c]);
        v *= factor[c];
        if (residual != nullptr) v += static_cast<float>(residual[at + c]);
        out[at + c] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void norm_forward_rows(const at::Tensor& x, const T* residual, const T* weight, const T* bias, const RowMask& mask,
                       bool dropout, float eps, bool is_rms, T* y, T* h, float* mean, float* rstd) {
  const int64_t n_rows = x.size(0), n_cols = x.size(1);
  const T* xs = x.data_ptr<T>();
  at::parallel_for(0, n_rows, grain(n_cols), [&](int64_t begin, int64_t end) {
    std::vector<float> factor(dropout ? mask.groups * kGroup : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t at = r * n_cols;
      if (dropout) mask.factors(r, n_cols, factor.data());
      float sum = 0.f;
      for (int64_t c = 0; c < n_cols; ++c) {
        float v = static_cast<float>(xs[at + c]);
        if (dropout) v *= factor[c];
        if (residual != nullptr) v += static_cast<float>(residual[at + c]);
        h[at + c] = static_cast<T>(v);
        sum += static_cast<float>(h[at + c]);  // the rounded h, as it is normalised
      }
      const float mu = is_rms ? 0.f : sum / static_cast<float>(n_cols);
      float squares = 0.f;
      for (int64_t c = 0; c < n_cols; ++c) {
        const float d = static_cast<float>(h[at + c]) - mu;
        squares += d * d;
      }
      const float rs = 1.f / std::sqrt(squares / static_cast<float>(n_cols) + eps);
      if (!is_rms) mean[r] = mu;
      rstd[r] = rs;
      for (int64_t c = 0; c < n_cols; ++c) {
        float v = (static_cast<float>(h[at + c]) - mu) * rs;
        if (weight != nullptr) v *= static_cast<float>(weight[c]);
        if (bias != nullptr) v += static_cast<float>(bias[c]);
        y[at + c] = static_cast<T>(v);
      }
    }
  });
}

// Backward of one row (see the module docstring of fusedls/backend/triton/dropout.py):
// g = dy w, dh = rstd (g - xhat mean(g xhat) [- mean(g)]) + dh_next, dresidual = dh, dx = dh m;
// adds dy xhat and dy to the row block's partial sums.
template <typename T>
struct NormBackward {
  const T *dy, *dh_next, *h, *weight;
  const float *mean, *rstd;
  bool is_rms;
  int64_t n_cols;
  T *dx, *dres;

  void row(int64_t r, const float* factor, float* dw, float* db) const {
    const int64_t at = r * n_cols;
    const float mu = is_rms ? 0.f : mean[r], rs = rstd[r];
    float sum_gx = 0.f, sum_g = 0.f;
    for (int64_t c = 0; c < n_cols; ++c) {
      const float xhat = (static_cast<float>(h[at + c]) - mu) * rs;
      const float d = static_cast<float>(dy[at + c]);
      if (dw != nullptr) dw[c] += d * xhat;
      if (db != nullptr) db[c] += d;
      const float g = weight != nullptr ? d * static_cast<float>(weight[c]) : d;
      sum_gx += g * xhat;
      sum_g += g;
    }
    const float inv_n = 1.f / static_cast<float>(n_cols);
    for (int64_t c = 0; c < n_cols; ++c) {
      const float xhat = (static_cast<float>(h[at + c]) - mu) * rs;
      const float d = static_cast<float>(dy[at + c]);
      const float g = weight != nullptr ? d * static_cast<float>(weight[c]) : d;
      float dh = g - xhat * (sum_gx * inv_n);
      if (!is_rms) dh -= sum_g * inv_n;
      dh *= rs;
      if (dh_next != nullptr) dh += static_cast<float>(dh_next[at + c]);
      if (dres != nullptr) dres[at + c] = static_cast<T>(dh);
      dx[at + c] = static_cast<T>(factor != nullptr ? dh * factor[c] : dh);
    }
  }
};

}  // namespace

void dropout_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, const at::Tensor& seed, int64_t threshold,
                     double scale, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  check_rows(out, x, "out");
  const int64_t n_cols = x.dim() == 0 ? 1 : x.size(-1);
  check_optional(bias, n_cols, x.scalar_type(), "bias");
  check_optional(residual, x.numel(), x.scalar_type(), "residual");
  const RowMask mask = row_mask(seed, n_cols, threshold, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_forward", [&] {
    dropout_rows<scalar_t>(x, data_or_null<scalar_t>(bias), data_or_null<scalar_t>(residual), mask,
                           out.data_ptr<scalar_t>());
  });
}

void dropout_add_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& seed, int64_t threshold, double scale, double eps,
                              bool is_rms, const at::Tensor& y, const at::Tensor& h, const at::Tensor& mean,
                              const at::Tensor& rstd) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous(), "x must be contiguous (R, N) CPU rows");
  check_rows(y, x, "y");
  check_rows(h, x, "h");
  check_optional(residual, x.numel(), x.scalar_type(), "residual");
  check_optional(weight, x.size(1), x.scalar_type(), "weight");
  check_optional(bias, x.size(1), x.scalar_type(), "bias");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0), "rstd must be fp32 (R,)");
  const bool dropout = seed.has_value() && seed->defined();
  const RowMask mask = row_mask(seed, x.size(1), threshold, scale);
  float* mean_out = is_rms ? nullptr : mean.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_add_norm_forward", [&] {
    norm_forward_rows<scalar_t>(x, data_or_null<scalar_t>(residual), data_or_null<scalar_t>(weight),
                                data_or_null<scalar_t>(bias), mask, dropout, static_cast<float>(eps), is_rms,
                                y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), mean_out, rstd.data_ptr<float>());
  });
}

void dropout_add_norm_backward(const at::Tensor& dy, const std::optional<at::Tensor>& dh_next, const at::Tensor& h,
                               const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::optional<at::Tensor>& seed, int64_t threshold,
                               double scale, bool is_rms, const at::Tensor& dx,
                               const std::optional<at::Tensor>& dresidual, const std::optional<at::Tensor>& dweight,
                               const std::optional<at::Tensor>& dbias) {
  TORCH_CHECK(h.dim() == 2 && h.device().is_cpu() && h.is_contiguous(), "h must be contiguous (R, N) CPU rows");
  check_rows(dy, h, "dy");
  check_rows(dx, h, "dx");
  check_optional(dh_next, h.numel(), h.scalar_type(), "dh_next");
  check_optional(dresidual, h.numel(), h.scalar_type(), "dresidual");
  check_optional(weight, h.size(1), h.scalar_type(), "weight");
  check_optional(dweight, h.size(1), at::kFloat, "dweight");
  check_optional(dbias, h.size(1), at::kFloat, "dbias");
  const int64_t n_rows = h.size(0), n_cols = h.size(1);
  const bool dropout = seed.has_value() && seed->defined();
  const RowMask mask = row_mask(seed, n_cols, threshold, scale);
  const bool want_w = dweight.has_value() && dweight->defined(), want_b = dbias.has_value() && dbias->defined();
  const int64_t n_blocks = (n_rows + kBlockRows - 1) / kBlockRows;
  std::vector<float> part_w(want_w ? n_blocks * n_cols : 0, 0.f), part_b(want_b ? n_blocks * n_cols : 0, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "dropout_add_norm_backward", [&] {
    const NormBackward<scalar_t> bwd{dy.data_ptr<scalar_t>(), data_or_null<scalar_t>(dh_next), h.data_ptr<scalar_t>(),
                                     data_or_null<scalar_t>(weight), is_rms ? nullptr : mean.data_ptr<float>(),
                                     rstd.data_ptr<float>(), is_rms, n_cols, dx.data_ptr<scalar_t>(),
                                     mutable_or_null<scalar_t>(dresidual)};
    const int64_t block_grain = std::max<int64_t>(1, grain(n_cols) / kBlockRows);
    at::parallel_for(0, n_blocks, block_grain, [&](int64_t begin, int64_t end) {
      std::vector<float> factor(dropout ? mask.groups * kGroup : 0);
      for (int64_t blk = begin; blk < end; ++blk) {
        float* dw = want_w ? part_w.data() + blk * n_cols : nullptr;
        float* db = want_b ? part_b.data() + blk * n_cols : nullptr;
        for (int64_t r = blk * kBlockRows; r < std::min(n_rows, (blk + 1) * kBlockRows); ++r) {
          if (dropout) mask.factors(r, n_cols, factor.data());
          bwd.row(r, dropout ? factor.data() : nullptr, dw, db);
        }
      }
    });
  });
  for (auto [want, part, out] : {std::tuple{want_w, &part_w, &dweight}, std::tuple{want_b, &part_b, &dbias}}) {
    if (!want) continue;
    float* total = (*out)->data_ptr<float>();
    std::fill(total, total + n_cols, 0.f);
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const float* p = part->data() + blk * n_cols;
      for (int64_t c = 0; c < n_cols; ++c) total[c] += p[c];
    }
  }
}

}  // namespace cpu
}  // namespace fusedls
