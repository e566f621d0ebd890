// Arguments of the native cross-entropy kernels (CPU and CUDA), as raw pointers and sizes.
//
// One struct for every kernel (forward, forward writing the gradient, backward, rescale), so
// the torch bindings of both backends fill it the same way and the kernels need neither torch
// nor each other. Plain C++ (no torch, no CUDA headers). The math the kernels implement is
// written out in fusedls/kernels/cross_entropy.py (module docstring); the Python-side
// contract is fusedls/eager/cross_entropy.py.
#pragma once

#include <cstdint>

namespace fusedls {

// Element types of the logits / gradient (and of probability targets).
enum class Dtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct CrossEntropyArgs {
  const void* logits = nullptr;        // (R, C) logits, classes contiguous, of type `dtype`
  int64_t stride_logits = 0;           // elements between consecutive rows of the logits
  const void* target = nullptr;        // (R,) int64 class ids, or (R, C) probabilities
  int64_t stride_target = 0;           // elements between targets (ids) / target rows (probabilities)
  Dtype target_dtype = Dtype::kFloat32;  // probabilities' type: `dtype` or kFloat32
  bool prob_target = false;            // targets are probabilities, not class ids
  const float* weight = nullptr;       // (C,) class weights, or null
  float* loss = nullptr;               // (R,) out (forward): row loss, 0 ignored, NaN bad id
  float* lse = nullptr;                // (R,) out (forward) / in (backward): log-sum-exp of the row
  float* coef = nullptr;               // (R,) out (forward) / in (backward): coefficient of p_c
  void* grad = nullptr;                // (R, C) out: gradient (forward: null = do not write it);
                                       // may alias `logits` (forward in place)
  int64_t stride_grad = 0;             // elements between rows of grad
  const float* scale = nullptr;        // factor of each row's gradient: forward's grad_scale
                                       // (1/D for mean), backward's upstream gradient
  int64_t stride_scale = 0;            // elements between rows' factors; 0 broadcasts one
  void* grad_target = nullptr;         // (R, C) out (backward, probabilities): dL/dtarget, or null
  int64_t stride_grad_target = 0;      // elements between rows of grad_target
  int64_t n_rows = 0;                  // R
  int64_t n_cols = 0;                  // C
  int64_t ignore_index = -100;         // class id whose rows give no loss and no gradient
  float keep = 1.f;                    // 1 - eps: mass on the target class / on t
  float spread = 0.f;                  // eps / C: mass on every class
  Dtype dtype = Dtype::kFloat32;       // type of logits and grad
  int64_t block_c = 0;                 // classes per chunk of a row sweep; 0: the kernels' default
};

}  // namespace fusedls
