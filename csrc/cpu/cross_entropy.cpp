// CPU kernels of fusedls.cross_entropy: label-smoothing cross-entropy forward (optionally
// writing the gradient, also in place over the logits), backward, and the in-place rescale.
//
// Compiled once per instruction set (fusedls/cpp/_build.py): with CPU_CAPABILITY_AVX512 or
// CPU_CAPABILITY_AVX2 defined (and the matching -m flags) at::vec::Vectorized<float> is a
// 16- or 8-lane register; without, ATen's portable scalar loops. Each variant goes into its own
// shared library, and only the one matching torch's CPU capability is loaded.
//
// Rows are split across torch's intra-op threads (at::parallel_for; this file is compiled
// with -fopenmp, without which at::parallel_for silently runs on one thread). Each thread owns
// whole rows, so it is also the first to touch its rows of a freshly allocated gradient.
//
// One row, C classes, in blocks of kBlock classes (fits in L1):
//   sweep 1 (statistics): per block, its max (pass a) then sum exp(x - m) and the linear sums
//     (pass b, the block still in L1); blocks are combined as online max / sum-exp, so the row
//     is read from memory once. fp32 throughout (bf16/fp16 converted on load).
//   sweep 2 (gradient), last block first (the likeliest still in L2): formed in fp32 and
//     rounded once when stored. The gradient formula, with p = softmax(x),
//     coef = keep w_y + spread W (class ids) or sum_c w_c t'_c (probabilities):
//       class ids:     dl/dx_c = coef p_c - spread w_c - keep w_y [c == y]
//       probabilities: dl/dx_c = coef p_c - w_c t'_c,   dl/dt_c = keep w_c (lse - x_c)
//     (derivation: fusedls/kernels/cross_entropy.py). The [c == y] term is applied to the one
//     element after the vector loop.
// Ignored rows: loss, lse, coef and gradient 0. A class id outside [0, C) that is not
// ignore_index gives a NaN loss and NaN gradient row (the torch binding raises ValueError before
// the forward kernel runs: csrc/common/torch_binding.h; the kernel never reads outside the row).
#include "cross_entropy.h"
#include "vec_io.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#define FUSEDLS_CPU_CAPABILITY_NAME "AVX512"
#elif defined(CPU_CAPABILITY_AVX2)
#define FUSEDLS_CPU_CAPABILITY_NAME "AVX2"
#else
#define FUSEDLS_CPU_CAPABILITY_NAME "DEFAULT"
#endif

namespace fusedls {
namespace cpu {
namespace {

constexpr int64_t kBlock = 4096;       // default classes per block: 16 KB of fp32, stays in L1
constexpr int64_t kRowsGrain = 16384;  // elements below which a call stays on one thread
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// exp of every lane with ATen's fast polynomial (ULP 20: well within fp32 tolerance); NaN in,
// NaN out (the AVX2 polynomial alone turns NaN into inf: e.g. x - lse for a row of -inf).
inline Vec exp_fast(const Vec& d) { return Vec::blendv(d.exp_u20(), d, d.isnan()); }

inline Vec load_weight(const float* w, int64_t c, Vec& second) {
  second = Vec::loadu(w + c + kLanes);
  return Vec::loadu(w + c);
}

struct RowStats {
  float m = kNegInf;  // max of the row
  float s = 0.f;      // sum exp(x - m) (relative to 0 while m is -inf)
  float sum_wx = 0.f; // class ids: sum_c w_c x_c; probabilities: sum_c w_c t'_c x_c
  float sum_w = 0.f;  // probabilities: sum_c w_c t'_c (class ids: computed once by the caller)
};

// Sweep 1 over one row. PROB: probability targets `t` (else class ids; SMOOTH: eps > 0 needs
// sum_c w_c x_c). W: class weights `w`.
template <typename T, typename TT, bool PROB, bool W, bool SMOOTH>
RowStats row_stats(const T* x, const TT* t, const float* w, int64_t n, int64_t block, float keep, float spread) {
  RowStats st;
  Vec v_wx(0.f), v_w(0.f);
  float s_wx = 0.f, s_w = 0.f;  // the tails' share
  const Vec v_keep(keep), v_spread(spread);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t len = std::min(block, n - b0);
    const int64_t vec_len = len - len % kUnit;
    const T* xb = x + b0;
    // Pass a: the block's max.
    Vec v_max(kNegInf);
    for (int64_t i = 0; i < vec_len; i += kUnit) {
      Vec a, b;
      Io<T>::load(xb + i, a, b);
      v_max = at::vec::maximum(v_max, at::vec::maximum(a, b));
    }
    float block_max = horizontal_max(v_max);
    for (int64_t i = vec_len; i < len; ++i) block_max = nan_max(block_max, static_cast<float>(xb[i]));
    const float m_new = nan_max(st.m, block_max);
    // A row (so far) of -inf: shift by 0 instead of -inf so exp() gives 0, not NaN.
    const float ref = m_new == kNegInf ? 0.f : m_new;
    const Vec v_ref(ref);
    // Pass b: sum exp(x - ref) and the linear sums, the block now in L1.
    Vec v_sum(0.f);
    for (int64_t i = 0; i < vec_len; i += kUnit) {
      Vec a, b;
      Io<T>::load(xb + i, a, b);
      v_sum = v_sum + exp_fast(a - v_ref) + exp_fast(b - v_ref);
      if constexpr (PROB) {
        Vec ta, tb;
        Io<TT>::load(t + b0 + i, ta, tb);
        ta = at::vec::fmadd(v_keep, ta, v_spread);  // t' = keep t + spread
        tb = at::vec::fmadd(v_keep, tb, v_spread);
        if constexpr (W) {
          Vec wb;
          const Vec wa = load_weight(w, b0 + i, wb);
          ta = ta * wa;
          tb = tb * wb;
        }
        v_w = v_w + ta + tb;
        // 0 * -inf gives NaN exactly as torch's -(t * log_softmax(x)).sum() does.
        v_wx = at::vec::fmadd(ta, a, at::vec::fmadd(tb, b, v_wx));
      } else if constexpr (SMOOTH) {
        if constexpr (W) {
          Vec wb;
          const Vec wa = load_weight(w, b0 + i, wb);
          v_wx = at::vec::fmadd(wa, a, at::vec::fmadd(wb, b, v_wx));
        } else {
          v_wx = v_wx + a + b;
        }
      }
    }
    float block_sum = horizontal_sum(v_sum);
    for (int64_t i = vec_len; i < len; ++i) {
      const float xi = static_cast<float>(xb[i]);
      block_sum += std::exp(xi - ref);
      if constexpr (PROB) {
        float ti = keep * static_cast<float>(t[b0 + i]) + spread;
        if constexpr (W) ti *= w[b0 + i];
        s_w += ti;
        s_wx += ti * xi;
      } else if constexpr (SMOOTH) {
        s_wx += W ? w[b0 + i] * xi : xi;
      }
    }
    st.s = st.s * std::exp(st.m - ref) + block_sum;  // st.m = -inf: exp(-inf) = 0
    st.m = m_new;
  }
  st.sum_wx = horizontal_sum(v_wx) + s_wx;
  st.sum_w = horizontal_sum(v_w) + s_w;
  return st;
}

// Sweep 2 over one row: g_c = (coef exp(x_c - lse) - sub_c) * scale, sub_c = w_c t'_c
// (probabilities) or spread w_c (class ids; the caller then fixes g_y). TGRAD also writes
// dl/dt_c = keep w_c (lse - x_c) * scale. `g` may be `x` (each step loads before it stores).
template <typename T, typename TT, bool PROB, bool W, bool TGRAD>
void grad_sweep(const T* x, T* g, const TT* t, TT* gt, const float* w, int64_t n, int64_t block, float lse,
                float coef, float keep, float spread, float scale) {
  const Vec v_lse(lse), v_coef(coef), v_scale(scale), v_keep(keep), v_spread(spread), v_dt(keep * scale);
  const int64_t n_blocks = (n + block - 1) / block;
  for (int64_t blk = n_blocks - 1; blk >= 0; --blk) {  // last block first: likeliest in cache
    const int64_t b0 = blk * block;
    const int64_t len = std::min(block, n - b0);
    const int64_t vec_end = b0 + len - len % kUnit;
    for (int64_t c = b0; c < vec_end; c += kUnit) {
      Vec a, b;
      Io<T>::load(x + c, a, b);
      Vec ga = v_coef * exp_fast(a - v_lse);
      Vec gb = v_coef * exp_fast(b - v_lse);
      Vec wa, wb;
      if constexpr (W) wa = load_weight(w, c, wb);
      if constexpr (PROB) {
        Vec ta, tb;
        Io<TT>::load(t + c, ta, tb);
        ta = at::vec::fmadd(v_keep, ta, v_spread);
        tb = at::vec::fmadd(v_keep, tb, v_spread);
        if constexpr (W) {
          ta = ta * wa;
          tb = tb * wb;
        }
        ga = ga - ta;
        gb = gb - tb;
        if constexpr (TGRAD) {
          Vec da = v_lse - a, db = v_lse - b;
          if constexpr (W) {
            da = da * wa;
            db = db * wb;
          }
          Io<TT>::store(gt + c, da * v_dt, db * v_dt);
        }
      } else if constexpr (W) {
        ga = ga - v_spread * wa;
        gb = gb - v_spread * wb;
      } else {
        ga = ga - v_spread;
        gb = gb - v_spread;
      }
      Io<T>::store(g + c, ga * v_scale, gb * v_scale);
    }
    for (int64_t c = vec_end; c < b0 + len; ++c) {
      const float xc = static_cast<float>(x[c]);
      float gc = coef * std::exp(xc - lse);
      if constexpr (PROB) {
        float tc = keep * static_cast<float>(t[c]) + spread;
        if constexpr (W) tc *= w[c];
        gc -= tc;
        if constexpr (TGRAD) gt[c] = static_cast<TT>((W ? w[c] : 1.f) * (lse - xc) * (keep * scale));
      } else {
        gc -= W ? spread * w[c] : spread;
      }
      g[c] = static_cast<T>(gc * scale);
    }
  }
}

template <typename T>
void zero_row(T* g, int64_t n) {
  std::memset(static_cast<void*>(g), 0, n * sizeof(T));  // 0 is all-zero bits in fp32/bf16/fp16
}

// Per-row constants of a class-id target: whether the row is ignored, whether the id is out of
// range, and y clamped into the row.
struct ClassTarget {
  bool ignored;
  bool bad;
  int64_t y;
};

inline ClassTarget class_target(const CrossEntropyArgs& a, int64_t row) {
  const int64_t y = static_cast<const int64_t*>(a.target)[row * a.stride_target];
  const bool ignored = y == a.ignore_index;
  const bool bad = !ignored && (y < 0 || y >= a.n_cols);
  return {ignored, bad, (ignored || bad) ? 0 : y};
}

// The [c == y] term of a class-id gradient, applied after the sweep (x_y read before it, as
// the sweep may have overwritten the logits).
template <typename T, bool W>
void fix_target_element(T* g, const CrossEntropyArgs& a, int64_t y, float x_y, float lse, float coef,
                        float target_term, float scale) {
  const float sub = a.spread * (W ? a.weight[y] : 1.f);
  g[y] = static_cast<T>((coef * std::exp(x_y - lse) - sub - target_term) * scale);
}

// Classes per block: the requested count rounded down to whole vector steps, or kBlock.
int64_t block_of(const CrossEntropyArgs& a) {
  return a.block_c > 0 ? std::max(kUnit, a.block_c - a.block_c % kUnit) : kBlock;
}

int64_t grain(int64_t n_cols) { return std::max<int64_t>(1, kRowsGrain / std::max<int64_t>(n_cols, 1)); }

template <typename T, typename TT, bool PROB, bool W, bool SMOOTH>
void forward_impl(const CrossEntropyArgs& a) {
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const int64_t n_cols = a.n_cols;
  const int64_t block = block_of(a);
  float w_sum = static_cast<float>(n_cols);  // W = sum_c w_c (class ids)
  if constexpr (W && !PROB) {
    w_sum = 0.f;
    for (int64_t c = 0; c < n_cols; ++c) w_sum += a.weight[c];
  }
  const float grad_scale = grad != nullptr ? a.scale[0] : 0.f;
  at::parallel_for(0, a.n_rows, grain(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = logits + r * a.stride_logits;
      T* g = grad != nullptr ? grad + r * a.stride_grad : nullptr;
      if constexpr (PROB) {
        const TT* t = static_cast<const TT*>(a.target) + r * a.stride_target;
        const RowStats st = row_stats<T, TT, true, W, false>(x, t, a.weight, n_cols, block, a.keep, a.spread);
        const float lse = st.m + std::log(st.s);
        a.loss[r] = st.sum_w * lse - st.sum_wx;
        a.lse[r] = lse;
        a.coef[r] = st.sum_w;
        if (g != nullptr) {
          grad_sweep<T, TT, true, W, false>(x, g, t, nullptr, a.weight, n_cols, block, lse, st.sum_w, a.keep,
                                            a.spread, grad_scale);
        }
      } else {
        const ClassTarget ct = class_target(a, r);
        if (ct.ignored) {
          a.loss[r] = a.lse[r] = a.coef[r] = 0.f;
          if (g != nullptr) zero_row(g, n_cols);
          continue;
        }
        const float target_term = a.keep * (W ? a.weight[ct.y] : 1.f);
        const float x_y = static_cast<float>(x[ct.y]);
        const RowStats st = row_stats<T, T, false, W, SMOOTH>(x, nullptr, a.weight, n_cols, block, a.keep, a.spread);
        const float lse = st.m + std::log(st.s);
        float loss = target_term * (lse - x_y);
        float coef = target_term;
        if constexpr (SMOOTH) {
          loss += a.spread * (w_sum * lse - st.sum_wx);
          coef += a.spread * w_sum;
        }
        const float poison = ct.bad ? kNaN : 0.f;
        a.loss[r] = loss + poison;
        a.lse[r] = lse;
        a.coef[r] = coef;
        if (g != nullptr) {
          const float scale = grad_scale + poison;
          grad_sweep<T, T, false, W, false>(x, g, nullptr, nullptr, a.weight, n_cols, block, lse, coef, a.keep,
                                            a.spread, scale);
          fix_target_element<T, W>(g, a, ct.y, x_y, lse, coef, target_term, scale);
        }
      }
    }
  });
}

template <typename T, typename TT, bool PROB, bool W, bool TGRAD>
void backward_impl(const CrossEntropyArgs& a) {
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const int64_t n_cols = a.n_cols;
  const int64_t block = block_of(a);
  at::parallel_for(0, a.n_rows, grain(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = logits + r * a.stride_logits;
      T* g = grad + r * a.stride_grad;
      float scale = a.scale[r * a.stride_scale];
      if constexpr (PROB) {
        const TT* t = static_cast<const TT*>(a.target) + r * a.stride_target;
        TT* gt = TGRAD ? static_cast<TT*>(a.grad_target) + r * a.stride_grad_target : nullptr;
        grad_sweep<T, TT, true, W, TGRAD>(x, g, t, gt, a.weight, n_cols, block, a.lse[r], a.coef[r], a.keep, a.spread,
                                          scale);
      } else {
        const ClassTarget ct = class_target(a, r);
        if (ct.ignored) {
          zero_row(g, n_cols);
          continue;
        }
        if (ct.bad) scale = kNaN;
        const float target_term = a.keep * (W ? a.weight[ct.y] : 1.f);
        const float x_y = static_cast<float>(x[ct.y]);
        grad_sweep<T, T, false, W, false>(x, g, nullptr, nullptr, a.weight, n_cols, block, a.lse[r], a.coef[r], a.keep,
                                          a.spread, scale);
        fix_target_element<T, W>(g, a, ct.y, x_y, a.lse[r], a.coef[r], target_term, scale);
      }
    }
  });
}

template <typename T>
void scale_grad_impl(const CrossEntropyArgs& a) {
  T* grad = static_cast<T*>(a.grad);
  const int64_t n_cols = a.n_cols;
  const int64_t vec_len = n_cols - n_cols % kUnit;
  at::parallel_for(0, a.n_rows, grain(n_cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float f = a.scale[r * a.stride_scale];
      if (f == 1.f) continue;  // loss.backward(): nothing to do
      T* g = grad + r * a.stride_grad;
      const Vec v_f(f);
      for (int64_t c = 0; c < vec_len; c += kUnit) {
        Vec ga, gb;
        Io<T>::load(g + c, ga, gb);
        Io<T>::store(g + c, ga * v_f, gb * v_f);
      }
      for (int64_t c = vec_len; c < n_cols; ++c) g[c] = static_cast<T>(static_cast<float>(g[c]) * f);
    }
  });
}

// ---------------------------------------------------------------------- compile-time dispatch

template <typename F>
void with_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kBFloat16: return f(c10::BFloat16{});
    case Dtype::kFloat16: return f(c10::Half{});
    default: return f(float{});
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(T{}, TT{}): TT is the probability targets' type, T's own or fp32 (the binding converts
// any other); for class ids, TT = T (unused).
template <typename F>
void with_types(const CrossEntropyArgs& a, F&& f) {
  with_dtype(a.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    if (a.prob_target && a.target_dtype != a.dtype) {
      f(T{}, float{});
    } else {
      f(T{}, T{});
    }
  });
}

}  // namespace

void cross_entropy_forward(const CrossEntropyArgs& a) {
  if (a.n_rows == 0) return;
  with_types(a, [&](auto t, auto tt) {
    using T = decltype(t);
    using TT = decltype(tt);
    with_bool(a.weight != nullptr, [&](auto w) {
      if (a.prob_target) {
        forward_impl<T, TT, true, decltype(w)::value, false>(a);
      } else {
        with_bool(a.spread != 0.f, [&](auto smooth) {
          forward_impl<T, T, false, decltype(w)::value, decltype(smooth)::value>(a);
        });
      }
    });
  });
}

void cross_entropy_backward(const CrossEntropyArgs& a) {
  if (a.n_rows == 0) return;
  with_types(a, [&](auto t, auto tt) {
    using T = decltype(t);
    using TT = decltype(tt);
    with_bool(a.weight != nullptr, [&](auto w) {
      if (a.prob_target) {
        with_bool(a.grad_target != nullptr, [&](auto tgrad) {
          backward_impl<T, TT, true, decltype(w)::value, decltype(tgrad)::value>(a);
        });
      } else {
        backward_impl<T, T, false, decltype(w)::value, false>(a);
      }
    });
  });
}

void cross_entropy_scale_grad(const CrossEntropyArgs& a) {
  if (a.n_rows == 0) return;
  with_dtype(a.dtype, [&](auto t) { scale_grad_impl<decltype(t)>(a); });
}

const char* capability() { return FUSEDLS_CPU_CAPABILITY_NAME; }

}  // namespace cpu
}  // namespace fusedls
