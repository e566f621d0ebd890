// CPU kernels of the multi-tensor norms, clipping and penalties (fusedls/cpp/foreach_norm.py;
// the math is that of fusedls/kernels/foreach_norm.py). Every tensor is cut into blocks of
// `block` elements, and the (tensor, block) pairs are the work items spread over torch's
// intra-op threads with at::parallel_for: a list of many small tensors and one of a few large
// ones both keep every thread busy.
//
//   norms (ord 1, 2, inf): each block's fp32 norm (span_norm of vector_norm.cpp: sums scaled by
//     a power of two near the block's largest |x|, so squares of 1e30 or 1e-30 neither overflow
//     nor underflow; inf: max |x|, NaN winning) goes into its own slot; then each tensor merges
//     its blocks in fp64 in block order (sum of norm^p, then the root; max for inf). The blocks
//     and their order depend only on the sizes, so results do not depend on the thread count.
//   scale_:  t = t * c in fp32, rounded once to t's dtype (as torch._foreach_mul_).
//   penalty backward: out = g sgn(t) (l1; sgn(0) = sgn(NaN) = 0) or out = t (2 g) (l2), in fp32
//     rounded once (as torch._foreach_sign + _foreach_mul_ / _foreach_mul).
#include "foreach_norm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_io.h"
#include "vector_norm.h"

namespace fusedls {
namespace cpu {
namespace {

struct Item {
  int64_t tensor;  // index in the list
  int64_t begin;   // first element of the block
  int64_t len;     // elements in the block
};

// The (tensor, block) work items in tensor then block order; first[i] is tensor i's first item.
std::vector<Item> items_of(at::TensorList tensors, int64_t block, std::vector<int64_t>* first) {
  TORCH_CHECK(block > 0, "foreach_norm: block must be positive");
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "the cpp backend runs on CPU tensors; tensors[", i, "] is on ", t.device());
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "foreach_norm: tensors[", i, "] must be fp32, bf16 or fp16, got ", dtype);
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "foreach_norm: tensors[", i, "] must be dense");
    if (first) first->push_back(static_cast<int64_t>(items.size()));
    for (int64_t b = 0; b < t.numel(); b += block) items.push_back({i, b, std::min(block, t.numel() - b)});
  }
  if (first) first->push_back(static_cast<int64_t>(items.size()));
  return items;
}

// Runs f(item) for every item, items spread over the threads (about 64K elements per task).
template <typename F>
void for_items(const std::vector<Item>& items, int64_t block, F&& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / block);
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(items[k]);
  });
}

template <typename Op>
void map_item(const at::Tensor& src, const at::Tensor& dst, const Item& it, const Op& op) {
  switch (src.scalar_type()) {
    case at::kFloat:
      return map_span(src.const_data_ptr<float>() + it.begin, dst.data_ptr<float>() + it.begin, it.len, op);
    case at::kBFloat16:
      return map_span(src.const_data_ptr<c10::BFloat16>() + it.begin, dst.data_ptr<c10::BFloat16>() + it.begin,
                      it.len, op);
    default:
      return map_span(src.const_data_ptr<c10::Half>() + it.begin, dst.data_ptr<c10::Half>() + it.begin, it.len, op);
  }
}

float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
              "foreach_norm: ", name, " must be a one-element fp32 CPU tensor");
  return *t.const_data_ptr<float>();
}

}  // namespace

at::Tensor foreach_norms(at::TensorList tensors, double ord, int64_t block) {
  const bool inf = ord == std::numeric_limits<double>::infinity();
  TORCH_CHECK(ord == 1.0 || ord == 2.0 || inf, "the cpp foreach_norm kernels take ord 1, 2 or inf, got ", ord);
  std::vector<int64_t> first;
  const std::vector<Item> items = items_of(tensors, block, &first);
  std::vector<float> partial(items.size());
  for_items(items, block, [&](const Item& it) {
    const at::Tensor& t = tensors[it.tensor];
    const char* base = static_cast<const char*>(t.const_data_ptr()) + it.begin * t.element_size();
    partial[&it - items.data()] = span_norm(base, t.scalar_type(), it.len, ord);
  });
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* norms = out.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    double acc = 0.0;
    for (int64_t k = first[i]; k < first[i + 1]; ++k) {
      const double v = partial[k];
      if (inf) {
        acc = (v > acc || std::isnan(v)) ? v : acc;
        if (std::isnan(acc)) break;
      } else {
        acc += ord == 2.0 ? v * v : v;
      }
    }
    norms[i] = ord == 2.0 ? std::sqrt(acc) : acc;
  }
  return out;
}

void foreach_scale_(at::TensorList tensors, const at::Tensor& coef, int64_t block) {
  const Vec c(scalar_of(coef, "coef"));
  const std::vector<Item> items = items_of(tensors, block, nullptr);
  for_items(items, block, [&](const Item& it) {
    const at::Tensor& t = tensors[it.tensor];
    map_item(t, t, it, [&](const Vec& x) { return x * c; });
  });
}

std::vector<at::Tensor> foreach_penalty_backward(at::TensorList tensors, const at::Tensor& grad, bool l2,
                                                 int64_t block) {
  const float g = scalar_of(grad, "grad");
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(at::empty_like(t));  // dense: t's strides
  const std::vector<Item> items = items_of(tensors, block, nullptr);
  const Vec v_g(g), v_2g(2.f * g), zero(0.f);
  for_items(items, block, [&](const Item& it) {
    if (l2) {
      map_item(tensors[it.tensor], out[it.tensor], it, [&](const Vec& x) { return x * v_2g; });
    } else {
      map_item(tensors[it.tensor], out[it.tensor], it,
               [&](const Vec& x) { return (x.gt(zero) - x.lt(zero)) * v_g; });  // gt / lt: 1.0 or 0.0
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace fusedls
