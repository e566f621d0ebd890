// CPU kernels of fusedls.vector_norm for ord 1, 2, inf and -inf (the other orders run eagerly:
// fusedls/cpp/vector_norm.py). The math is that of fusedls/kernels/vector_norm.py (its module
// docstring derives the gradients); here, per row of N elements:
//
//   ord 1, 2: norm^p = r^p s with r a power of two near the largest |x| seen so far (from its
//     exponent bits, clamped to [2^-126, 2^126] so r and 1/r are normal fp32), each term
//     |x| / r (squared for ord 2) exact to scale: fp32 values near 1e30 whose squares overflow,
//     or near 1e-30 (and subnormals) whose squares underflow, sum without trouble (the LAPACK
//     nrm2 idea, with exact scaling). The row is swept once, in blocks of kBlock elements: a
//     block's max |x| (pass a, the block then in L1) raises r when needed (s is multiplied by
//     the exact ratio (r_old / r_new)^p), then its terms are summed (pass b) into fp32 vector
//     accumulators. NaN reaches s, hence the norm; inf gives inf.
//   ord +-inf: r = max (min) |x|, NaN winning as in torch, then a second sweep counts the
//     elements equal to r (the ties share the gradient; none when r is NaN).
//   gradient (g the row's upstream gradient, n its norm, sgn(NaN) = 0 as torch):
//     ord 1:     g sgn(x)
//     ord 2:     g x / n, 0 where x == 0 unless n is NaN (torch: NaN there too)
//     ord +-inf: g sgn(x) / c where |x| == n (c ties), 0 elsewhere
//
// Rows are split across torch's intra-op threads (at::parallel_for); each row is reduced by one
// thread in a fixed order, so results do not depend on the thread count. fp32 accumulation.
#include "vector_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "vec_io.h"

namespace fusedls {
namespace cpu {
namespace {

constexpr int64_t kBlock = 4096;       // elements per block of a row sweep: 16 KB of fp32, in L1
constexpr int64_t kRowsGrain = 16384;  // elements below which a call stays on one thread
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t grain(int64_t n_cols) { return std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(1, n_cols)); }

// (r, 1/r): powers of two with m / r in [1, 2) for normal m < 2^127, both normal fp32 (NaN and
// inf give 2^126).
inline void pow2_scale(float m, float& r, float& inv) {
  uint32_t bits;
  std::memcpy(&bits, &m, sizeof bits);
  const int k = std::min(std::max(static_cast<int>((bits >> 23) & 0xFF) - 127, -126), 126);
  const uint32_t r_bits = static_cast<uint32_t>(k + 127) << 23;
  const uint32_t inv_bits = static_cast<uint32_t>(127 - k) << 23;
  std::memcpy(&r, &r_bits, sizeof r);
  std::memcpy(&inv, &inv_bits, sizeof inv);
}

// Max |x| (or min |x| for NEG) of x[0, len), NaN winning.
template <typename T, bool NEG>
float extreme_abs(const T* x, int64_t len, float start) {
  const int64_t vec_len = len - len % kUnit;
  Vec v(start);
  for (int64_t i = 0; i < vec_len; i += kUnit) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    if constexpr (NEG) {
      v = at::vec::minimum(v, at::vec::minimum(a.abs(), b.abs()));
    } else {
      v = at::vec::maximum(v, at::vec::maximum(a.abs(), b.abs()));
    }
  }
  float m = horizontal_max<NEG>(v);
  for (int64_t i = vec_len; i < len; ++i) {
    const float a = std::abs(static_cast<float>(x[i]));
    m = NEG ? nan_min(m, a) : nan_max(m, a);
  }
  return m;
}

// The ord 1 (SQUARE false) or ord 2 norm of one row.
template <typename T, bool SQUARE>
float row_sum_norm(const T* x, int64_t n) {
  float m = 0.f, r, inv, s = 0.f;
  pow2_scale(m, r, inv);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    const int64_t vec_len = len - len % kUnit;
    const T* xb = x + b0;
    // Pass a: a larger max raises the scale; s follows by the exact ratio (a power of two).
    const float block_max = extreme_abs<T, false>(xb, len, 0.f);
    if (!(block_max <= m)) {
      m = nan_max(m, block_max);
      float r_new, inv_new;
      pow2_scale(m, r_new, inv_new);
      const float t = r * inv_new;
      s *= SQUARE ? t * t : t;
      r = r_new;
      inv = inv_new;
    }
    // Pass b: the scaled terms.
    const Vec v_inv(inv);
    Vec acc_a(0.f), acc_b(0.f);
    for (int64_t i = 0; i < vec_len; i += kUnit) {
      Vec a, b;
      Io<T>::load(xb + i, a, b);
      a = a * v_inv;
      b = b * v_inv;
      if constexpr (SQUARE) {
        acc_a = at::vec::fmadd(a, a, acc_a);
        acc_b = at::vec::fmadd(b, b, acc_b);
      } else {
        acc_a = acc_a + a.abs();
        acc_b = acc_b + b.abs();
      }
    }
    float block_sum = horizontal_sum(acc_a + acc_b);
    for (int64_t i = vec_len; i < len; ++i) {
      const float a = static_cast<float>(xb[i]) * inv;
      block_sum += SQUARE ? a * a : std::abs(a);
    }
    s += block_sum;
  }
  return SQUARE ? r * std::sqrt(s) : r * s;
}

// The ord inf (NEG false) or -inf norm of one row and the number of elements tied at it.
template <typename T, bool NEG>
float row_extreme(const T* x, int64_t n, float& ties) {
  const float r = extreme_abs<T, NEG>(x, n, NEG ? kInf : 0.f);
  const int64_t vec_len = n - n % kUnit;
  const Vec v_r(r);
  Vec acc(0.f);
  for (int64_t i = 0; i < vec_len; i += kUnit) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    acc = acc + a.abs().eq(v_r) + b.abs().eq(v_r);  // eq: 1.0 where equal, else 0.0
  }
  float c = horizontal_sum(acc);
  for (int64_t i = vec_len; i < n; ++i) c += std::abs(static_cast<float>(x[i])) == r ? 1.f : 0.f;
  ties = c;
  return r;
}

enum class Kind { kOne, kTwo, kMax, kMin };

Kind kind_of(double ord) {
  if (ord == 1.0) return Kind::kOne;
  if (ord == 2.0) return Kind::kTwo;
  if (std::isinf(ord)) return ord > 0 ? Kind::kMax : Kind::kMin;
  TORCH_CHECK(false, "the cpp vector_norm kernels take ord 1, 2, inf or -inf, got ", ord);
}

template <typename F>
void with_dtype(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "the cpp vector_norm kernels take fp32, bf16 or fp16 rows, got ", t.scalar_type());
  }
}

template <typename T>
void forward_rows(const at::Tensor& rows, Kind kind, float* norm, float* count) {
  const int64_t n = rows.size(1), stride = rows.stride(0);
  const T* base = rows.const_data_ptr<T>();
  at::parallel_for(0, rows.size(0), grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x = base + row * stride;
      switch (kind) {
        case Kind::kOne: norm[row] = row_sum_norm<T, false>(x, n); break;
        case Kind::kTwo: norm[row] = row_sum_norm<T, true>(x, n); break;
        case Kind::kMax: norm[row] = row_extreme<T, false>(x, n, count[row]); break;
        case Kind::kMin: norm[row] = row_extreme<T, true>(x, n, count[row]); break;
      }
    }
  });
}

// The gradient of one pair of vectors (kUnit elements) of a row.
struct GradRow {
  Kind kind;
  Vec g;      // ord 1, 2: the upstream gradient; +-inf: it divided by the ties
  Vec n;      // the norm
  bool keep_zero_nan;  // ord 2: the norm is NaN, so x == 0 gives NaN as everywhere else

  inline Vec operator()(const Vec& x) const {
    const Vec zero(0.f);
    const Vec sgn = (x.gt(zero)) - (x.lt(zero));  // gt / lt: 1.0 or 0.0; NaN: 0
    switch (kind) {
      case Kind::kOne: return sgn * g;
      case Kind::kTwo: {
        const Vec d = x / n * g;
        return keep_zero_nan ? d : Vec::blendv(d, zero, x == zero);
      }
      default: return Vec::blendv(zero, sgn * g, x.abs() == n);
    }
  }
};

template <typename T>
void backward_rows(const float* grad, const at::Tensor& rows, const float* norm, const float* count, Kind kind,
                   T* dx) {
  const int64_t n_cols = rows.size(1), stride = rows.stride(0);
  const T* base = rows.const_data_ptr<T>();
  at::parallel_for(0, rows.size(0), grain(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool extreme = kind == Kind::kMax || kind == Kind::kMin;
      const float g = extreme ? grad[row] / count[row] : grad[row];
      const GradRow f{kind, Vec(g), Vec(norm[row]), std::isnan(norm[row])};
      map_span(base + row * stride, dx + row * n_cols, n_cols, f);
    }
  });
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              "vector_norm: ", name, " must be a contiguous fp32 CPU vector of ", n, " elements");
}

void check_rows(const at::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu(), "the cpp backend runs on CPU tensors; rows is on ", rows.device());
  TORCH_CHECK(rows.dim() == 2 && (rows.size(1) <= 1 || rows.stride(1) == 1),
              "vector_norm: rows must be (R, N) with contiguous columns");
}

}  // namespace

template <typename T>
float span_norm_of(const T* x, int64_t n, double ord) {
  if (ord == 1.0) return row_sum_norm<T, false>(x, n);
  if (ord == 2.0) return row_sum_norm<T, true>(x, n);
  return extreme_abs<T, false>(x, n, 0.f);
}

float span_norm(const void* x, at::ScalarType dtype, int64_t n, double ord) {
  TORCH_CHECK(ord == 1.0 || ord == 2.0 || ord == std::numeric_limits<double>::infinity(),
              "span_norm takes ord 1, 2 or inf, got ", ord);
  if (n == 0) return 0.f;
  switch (dtype) {
    case at::kFloat: return span_norm_of(static_cast<const float*>(x), n, ord);
    case at::kBFloat16: return span_norm_of(static_cast<const c10::BFloat16*>(x), n, ord);
    case at::kHalf: return span_norm_of(static_cast<const c10::Half*>(x), n, ord);
    default: TORCH_CHECK(false, "span_norm: fp32, bf16 or fp16 data, got ", dtype);
  }
}

void vector_norm_forward(const at::Tensor& rows, double ord, const at::Tensor& norm, const at::Tensor& count) {
  check_rows(rows);
  const Kind kind = kind_of(ord);
  const int64_t n_rows = rows.size(0);
  check_vector(norm, n_rows, "norm");
  const bool extreme = kind == Kind::kMax || kind == Kind::kMin;
  if (extreme) check_vector(count, n_rows, "count");
  if (n_rows == 0) return;
  TORCH_CHECK(rows.size(1) > 0, "vector_norm: rows must have at least one column");
  with_dtype(rows, [&](auto t) {
    using T = decltype(t);
    forward_rows<T>(rows, kind, norm.data_ptr<float>(), extreme ? count.data_ptr<float>() : nullptr);
  });
}

void vector_norm_backward(const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& norm,
                          const at::Tensor& count, double ord, const at::Tensor& dx) {
  check_rows(rows);
  const Kind kind = kind_of(ord);
  const int64_t n_rows = rows.size(0);
  check_vector(grad, n_rows, "grad");
  check_vector(norm, n_rows, "norm");
  const bool extreme = kind == Kind::kMax || kind == Kind::kMin;
  if (extreme) check_vector(count, n_rows, "count");
  TORCH_CHECK(dx.device().is_cpu() && dx.scalar_type() == rows.scalar_type() && dx.sizes() == rows.sizes() &&
                  dx.is_contiguous(),
              "vector_norm: dx must be a contiguous CPU tensor of rows' shape and dtype");
  if (rows.numel() == 0) return;
  with_dtype(rows, [&](auto t) {
    using T = decltype(t);
    backward_rows<T>(grad.const_data_ptr<float>(), rows, norm.const_data_ptr<float>(),
                     extreme ? count.const_data_ptr<float>() : nullptr, kind, dx.data_ptr<T>());
  });
}

}  // namespace cpu
}  // namespace fusedls
