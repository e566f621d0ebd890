// CUDA kernels of fusedls.cross_entropy: the design of the Triton kernels
// (fusedls/kernels/cross_entropy.py, whose docstring derives the gradient) in CUDA C++.
//
// One thread block owns one row of the (R, C) logits at a time:
//   sweep 1 reads the row from HBM with 128-bit loads (when the row is 16-byte aligned; scalar
//     loads otherwise): per-thread online max / sum-exp in fp32 over each loaded vector, plus
//     the linear sums of the smoothing term / probability targets; then a warp-shuffle and a
//     shared-memory reduction across the block;
//   sweep 2 (forward writing the gradient, or backward) re-reads the row, which this block has
//     just read, so it comes from L2, and writes the gradient formed in fp32, rounded once.
// The forward that writes the gradient is persistent: its grid is capped so the rows in flight
// fit in half the L2. Forward + backward thus reads the logits from HBM once and writes the
// gradient once; backward only rescales it (scale kernel, rows whose factor is 1 skipped on the
// device: no host synchronisation anywhere).
//
// Gradient of a row (p = softmax(x), keep = 1 - eps, spread = eps / C, w class weights):
//   class ids:     dl/dx_c = coef p_c - spread w_c - keep w_y [c == y],  coef = keep w_y + spread W
//   probabilities: dl/dx_c = coef p_c - w_c t'_c,  coef = sum_c w_c t'_c,  t' = keep t + spread
//                  dl/dt_c = keep w_c (lse - x_c)
// Ignored rows: loss, lse, coef, gradient 0. A class id outside [0, C) that is not ignore_index:
// NaN loss and NaN gradient row, never a read outside the row. Offsets are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cross_entropy.cuh"

namespace fusedls {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;  // threads per block (16 warps)
constexpr int kWarps = kMaxThreads / 32;
__device__ constexpr float kNegInf = -__builtin_huge_valf();

// ------------------------------------------------------------------------- element access

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 16 bytes of T: one 128-bit load or store.
template <typename T>
struct Pack {
  static constexpr int kN = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kN];
  };
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  Pack<T> pack;
  pack.raw = *reinterpret_cast<const uint4*>(p);
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  *reinterpret_cast<uint4*>(p) = pack.raw;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Visits every class of a row once, spread over the block: f(c, x_c) for a 16-byte pack of
// classes at a time (vector part, when `vec` is true), then one class at a time (the rest).
template <typename T, typename F>
__device__ __forceinline__ void for_each_class(const T* row, int64_t n_cols, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  const int64_t n_packs = vec ? n_cols / kN : 0;
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    const Pack<T> pack = load_pack(row + i * kN);
#pragma unroll
    for (int k = 0; k < kN; ++k) f(i * kN + k, to_float(pack.v[k]));
  }
  for (int64_t c = n_packs * kN + threadIdx.x; c < n_cols; c += blockDim.x) f(c, to_float(row[c]));
}

// ------------------------------------------------------------------------------ reductions

struct Stats {
  float m;       // running max
  float s;       // sum exp(x - m)
  float sum_wx;  // class ids: sum w_c x_c; probabilities: sum w_c t'_c x_c
  float sum_w;   // probabilities: sum w_c t'_c
};

__device__ __forceinline__ float rescale(float s, float m_old, float m_new) {
  return m_old == kNegInf ? 0.f : s * __expf(m_old - m_new);  // a -inf max holds an empty sum
}

__device__ __forceinline__ Stats combine(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  return {m, rescale(a.s, a.m, m) + rescale(b.s, b.m, m), a.sum_wx + b.sum_wx, a.sum_w + b.sum_w};
}

// The block's combined statistics, in every thread. `shared` holds kWarps entries.
__device__ Stats block_reduce(Stats st, Stats* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats other = {__shfl_xor_sync(0xffffffff, st.m, offset), __shfl_xor_sync(0xffffffff, st.s, offset),
                         __shfl_xor_sync(0xffffffff, st.sum_wx, offset),
                         __shfl_xor_sync(0xffffffff, st.sum_w, offset)};
    st = combine(st, other);
  }
  const int warp = threadIdx.x / 32;
  const int n_warps = (blockDim.x + 31) / 32;
  if (threadIdx.x % 32 == 0) shared[warp] = st;
  __syncthreads();
  Stats total = shared[0];
  for (int w = 1; w < n_warps; ++w) total = combine(total, shared[w]);
  __syncthreads();  // `shared` is reused by the next row
  return total;
}

// -------------------------------------------------------------------------------- sweeps

// Sweep 1 of a row: this thread's share of the statistics, then the block's.
template <typename T, typename TT, bool PROB, bool W, bool SMOOTH>
__device__ Stats row_stats(const T* x, const TT* t, const float* w, int64_t n_cols, bool vec, float keep,
                           float spread, Stats* shared) {
  Stats st = {kNegInf, 0.f, 0.f, 0.f};
  for_each_class(x, n_cols, vec, [&](int64_t c, float xc) {
    if (xc > st.m || xc != xc) {  // a NaN logit becomes the max: the row's lse is NaN, as torch's
      st.s = rescale(st.s, st.m, xc);
      st.m = xc;
    }
    st.s += st.m == kNegInf ? 0.f : __expf(xc - st.m);
    if constexpr (PROB) {
      float tc = keep * to_float(t[c]) + spread;
      if constexpr (W) tc *= w[c];
      st.sum_w += tc;
      st.sum_wx += tc * xc;  // 0 * -inf = NaN, as torch's -(t * log_softmax(x)).sum()
    } else if constexpr (SMOOTH) {
      st.sum_wx += W ? w[c] * xc : xc;
    }
  });
  return block_reduce(st, shared);
}

// Sweep 2 of a row: g_c = (coef exp(x_c - lse) - sub_c) * scale (see the file comment);
// y < 0 for probability targets. TGRAD also writes dl/dt. `g` may alias `x`.
template <typename T, typename TT, bool PROB, bool W, bool TGRAD>
__device__ void grad_sweep(const T* x, T* g, const TT* t, TT* gt, const float* w, int64_t n_cols, bool vec,
                           int64_t y, float lse, float coef, float target_term, float keep, float spread,
                           float scale) {
  auto grad_of = [&](int64_t c, float xc) {
    float gc = coef * __expf(xc - lse);
    if constexpr (PROB) {
      float tc = keep * to_float(t[c]) + spread;
      if constexpr (W) tc *= w[c];
      gc -= tc;
      if constexpr (TGRAD) gt[c] = from_float<TT>((W ? w[c] : 1.f) * (lse - xc) * (keep * scale));
    } else {
      gc -= W ? spread * w[c] : spread;
      if (c == y) gc -= target_term;
    }
    return gc * scale;
  };
  constexpr int kN = Pack<T>::kN;
  const int64_t n_packs = vec ? n_cols / kN : 0;
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    Pack<T> pack = load_pack(x + i * kN);
#pragma unroll
    for (int k = 0; k < kN; ++k) pack.v[k] = from_float<T>(grad_of(i * kN + k, to_float(pack.v[k])));
    store_pack(g + i * kN, pack);
  }
  for (int64_t c = n_packs * kN + threadIdx.x; c < n_cols; c += blockDim.x) {
    g[c] = from_float<T>(grad_of(c, to_float(x[c])));
  }
}

template <typename T>
__device__ void zero_row(T* g, int64_t n_cols) {
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) g[c] = from_float<T>(0.f);
}

struct ClassTarget {
  bool ignored;
  bool bad;
  int64_t y;  // clamped into the row
};

__device__ __forceinline__ ClassTarget class_target(const CrossEntropyArgs& a, int64_t row) {
  const int64_t y = static_cast<const int64_t*>(a.target)[row * a.stride_target];
  const bool ignored = y == a.ignore_index;
  const bool bad = !ignored && (y < 0 || y >= a.n_cols);
  return {ignored, bad, (ignored || bad) ? 0 : y};
}

// --------------------------------------------------------------------------------- kernels

// W = sum_c w_c, the same for every row (class ids with weights and smoothing): each block
// sums the weights once, from L2, rather than the host synchronising or allocating a scratch.
template <bool W>
__device__ float weight_sum(const float* w, int64_t n_cols, Stats* shared) {
  if constexpr (!W) {
    return static_cast<float>(n_cols);
  } else {
    Stats st = {kNegInf, 0.f, 0.f, 0.f};
    for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) st.sum_w += w[c];
    return block_reduce(st, shared).sum_w;
  }
}

// Forward: one block per row at a time (rows blockIdx.x, blockIdx.x + gridDim.x, ...).
template <typename T, typename TT, bool PROB, bool W, bool SMOOTH, bool WRITE_GRAD>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const CrossEntropyArgs a) {
  __shared__ Stats shared[kWarps];
  const float grad_scale = WRITE_GRAD ? a.scale[0] : 0.f;
  const float w_sum = (!PROB && SMOOTH) ? weight_sum<W>(a.weight, a.n_cols, shared) : 0.f;
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + row * a.stride_logits;
    T* g = WRITE_GRAD ? static_cast<T*>(a.grad) + row * a.stride_grad : nullptr;
    const TT* t = PROB ? static_cast<const TT*>(a.target) + row * a.stride_target : nullptr;
    const bool vec = aligned16(x) && (!WRITE_GRAD || aligned16(g));
    float target_term = 0.f, x_y = 0.f, poison = 0.f;
    int64_t y = -1;
    if constexpr (!PROB) {
      const ClassTarget ct = class_target(a, row);
      if (ct.ignored) {
        if (threadIdx.x == 0) a.loss[row] = a.lse[row] = a.coef[row] = 0.f;
        if constexpr (WRITE_GRAD) zero_row(g, a.n_cols);
        continue;
      }
      y = ct.y;
      target_term = a.keep * (W ? a.weight[y] : 1.f);
      x_y = to_float(x[y]);  // read before any thread of the block overwrites the row
      poison = ct.bad ? __int_as_float(0x7fc00000) : 0.f;
    }
    const Stats st = row_stats<T, TT, PROB, W, SMOOTH>(x, t, a.weight, a.n_cols, vec, a.keep, a.spread, shared);
    const float lse = st.m + logf(st.s);  // accurate log: loss = lse - x_y may cancel
    float loss, coef;
    if constexpr (PROB) {
      loss = st.sum_w * lse - st.sum_wx;
      coef = st.sum_w;
    } else {
      loss = target_term * (lse - x_y);
      coef = target_term;
      if constexpr (SMOOTH) {
        loss += a.spread * (w_sum * lse - st.sum_wx);
        coef += a.spread * w_sum;
      }
    }
    if (threadIdx.x == 0) {
      a.loss[row] = loss + poison;
      a.lse[row] = lse;
      a.coef[row] = coef;
    }
    if constexpr (WRITE_GRAD) {
      grad_sweep<T, TT, PROB, W, false>(x, g, t, nullptr, a.weight, a.n_cols, vec, y, lse, coef, target_term,
                                        a.keep, a.spread, grad_scale + poison);
    }
  }
}

template <typename T, typename TT, bool PROB, bool W, bool TGRAD>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(const CrossEntropyArgs a) {
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + row * a.stride_logits;
    T* g = static_cast<T*>(a.grad) + row * a.stride_grad;
    const TT* t = PROB ? static_cast<const TT*>(a.target) + row * a.stride_target : nullptr;
    TT* gt = TGRAD ? static_cast<TT*>(a.grad_target) + row * a.stride_grad_target : nullptr;
    bool vec = aligned16(x) && aligned16(g);
    float scale = a.scale[row * a.stride_scale];
    float target_term = 0.f;
    int64_t y = -1;
    if constexpr (!PROB) {
      const ClassTarget ct = class_target(a, row);
      if (ct.ignored) {
        zero_row(g, a.n_cols);
        continue;
      }
      y = ct.y;
      target_term = a.keep * (W ? a.weight[y] : 1.f);
      if (ct.bad) scale = __int_as_float(0x7fc00000);
    }
    grad_sweep<T, TT, PROB, W, TGRAD>(x, g, t, gt, a.weight, a.n_cols, vec, y, a.lse[row], a.coef[row], target_term,
                                      a.keep, a.spread, scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) scale_grad_kernel(const CrossEntropyArgs a) {
  constexpr int kN = Pack<T>::kN;
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    const float f = a.scale[row * a.stride_scale];
    if (f == 1.f) continue;  // loss.backward(): decided on the device, no host sync
    T* g = static_cast<T*>(a.grad) + row * a.stride_grad;
    const int64_t n_packs = aligned16(g) ? a.n_cols / kN : 0;
    for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
      Pack<T> pack = load_pack(g + i * kN);
#pragma unroll
      for (int k = 0; k < kN; ++k) pack.v[k] = from_float<T>(to_float(pack.v[k]) * f);
      store_pack(g + i * kN, pack);
    }
    for (int64_t c = n_packs * kN + threadIdx.x; c < a.n_cols; c += blockDim.x) g[c] = from_float<T>(to_float(g[c]) * f);
  }
}

// ---------------------------------------------------------------------------------- launch

int threads_for(int64_t n_cols) { return n_cols >= 8192 ? 512 : n_cols >= 1024 ? 256 : 128; }

// Grid of a kernel sweeping each row once or twice: one block per row, capped at what the
// device runs at once; with WRITE_GRAD also at half the L2 worth of rows in flight.
int grid_for(int64_t n_rows, int64_t row_bytes, bool fit_l2) {
  int device = 0, sms = 1, l2 = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  int64_t grid = static_cast<int64_t>(sms) * 4;
  if (fit_l2 && row_bytes > 0) grid = std::max<int64_t>(sms, std::min<int64_t>(grid, (l2 / 2) / row_bytes));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(grid, n_rows)));
}

template <typename F>
void with_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    case Dtype::kFloat16: return f(__half{});
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

size_t element_size(Dtype d) { return d == Dtype::kFloat32 ? 4 : 2; }

}  // namespace
}  // namespace cuda
}  // namespace fusedls

using fusedls::CrossEntropyArgs;
using namespace fusedls::cuda;

extern "C" cudaError_t fusedls_cross_entropy_forward_cuda(const CrossEntropyArgs* args, cudaStream_t stream) {
  const CrossEntropyArgs& a = *args;
  if (a.n_rows == 0) return cudaSuccess;
  const bool write_grad = a.grad != nullptr;
  const int threads = threads_for(a.n_cols);
  const int grid = grid_for(a.n_rows, a.n_cols * static_cast<int64_t>(element_size(a.dtype)), write_grad);
  const bool smooth = a.spread != 0.f;
  with_types(a, [&](auto t, auto tt) {
    using T = decltype(t);
    using TT = decltype(tt);
    with_bool(a.weight != nullptr, [&](auto w) {
      with_bool(write_grad, [&](auto wg) {
        constexpr bool W = decltype(w)::value, G = decltype(wg)::value;
        if (a.prob_target) {
          forward_kernel<T, TT, true, W, false, G><<<grid, threads, 0, stream>>>(a);
        } else {
          with_bool(smooth, [&](auto sm) {
            forward_kernel<T, T, false, W, decltype(sm)::value, G><<<grid, threads, 0, stream>>>(a);
          });
        }
      });
    });
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fusedls_cross_entropy_backward_cuda(const CrossEntropyArgs* args, cudaStream_t stream) {
  const CrossEntropyArgs& a = *args;
  if (a.n_rows == 0) return cudaSuccess;
  const int threads = threads_for(a.n_cols);
  const int grid = grid_for(a.n_rows, 0, false);
  with_types(a, [&](auto t, auto tt) {
    using T = decltype(t);
    using TT = decltype(tt);
    with_bool(a.weight != nullptr, [&](auto w) {
      constexpr bool W = decltype(w)::value;
      if (a.prob_target) {
        with_bool(a.grad_target != nullptr, [&](auto tg) {
          backward_kernel<T, TT, true, W, decltype(tg)::value><<<grid, threads, 0, stream>>>(a);
        });
      } else {
        backward_kernel<T, T, false, W, false><<<grid, threads, 0, stream>>>(a);
      }
    });
  });
  return cudaGetLastError();
}

extern "C" cudaError_t fusedls_cross_entropy_scale_grad_cuda(const CrossEntropyArgs* args, cudaStream_t stream) {
  const CrossEntropyArgs& a = *args;
  if (a.n_rows == 0) return cudaSuccess;
  const int grid = grid_for(a.n_rows, 0, false);
  with_dtype(a.dtype, [&](auto t) {
    scale_grad_kernel<decltype(t)><<<grid, threads_for(a.n_cols), 0, stream>>>(a);
  });
  return cudaGetLastError();
}
