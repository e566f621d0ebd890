// Vector helpers shared by the CPU kernels (cross_entropy.cpp, vector_norm.cpp, foreach_norm.cpp):
// fp32 at::vec::Vectorized registers, loading / storing fp32, bf16 or fp16 data two registers at
// a time, horizontal reductions and an elementwise map. Compiled with each library variant's
// instruction-set flags (fusedls/cpp/_build.py): 16 lanes with AVX512, 8 with AVX2, ATen's
// scalar loops by default.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace fusedls {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kUnit = 2 * kLanes;  // elements per vector step: two fp32 registers

// kUnit elements of T <-> two fp32 vectors.
template <typename T>
struct Io {
  static_assert(std::is_same_v<T, float> || at::vec::Vectorized<T>::size() == kUnit,
                "a reduced-precision vector must hold two fp32 vectors' worth of elements");
  static inline void load(const T* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<T, float>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kLanes);
    } else {
      std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    }
  }
  static inline void store(T* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<T, float>) {
      a.store(p);
      b.store(p + kLanes);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);  // round to nearest even
    }
  }
};

inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }  // NaN wins, as torch
inline float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }  // NaN wins, as torch

// The largest (smallest for MIN) lane, NaN winning.
template <bool MIN = false>
inline float horizontal_max(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kLanes; ++i) m = MIN ? nan_min(m, lanes[i]) : nan_max(m, lanes[i]);
  return m;
}

inline float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += lanes[i];
  return s;
}

// dst[0, n) = op(src[0, n)) elementwise in fp32 (op maps fp32 vectors), T the storage type; the
// tail goes through one zero-padded vector step. src == dst is fine (in place).
template <typename T, typename Op>
void map_span(const T* src, T* dst, int64_t n, const Op& op) {
  const int64_t vec_len = n - n % kUnit;
  for (int64_t i = 0; i < vec_len; i += kUnit) {
    Vec a, b;
    Io<T>::load(src + i, a, b);
    Io<T>::store(dst + i, op(a), op(b));
  }
  if (vec_len < n) {  // the tail, through a zero-padded vector step
    alignas(64) float in[kUnit] = {}, out[kUnit];
    for (int64_t i = vec_len; i < n; ++i) in[i - vec_len] = static_cast<float>(src[i]);
    op(Vec::loadu(in)).store(out);
    op(Vec::loadu(in + kLanes)).store(out + kLanes);
    for (int64_t i = vec_len; i < n; ++i) dst[i] = static_cast<T>(out[i - vec_len]);
  }
}

}  // namespace cpu
}  // namespace fusedls
