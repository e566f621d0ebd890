// CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu): extern "C" launchers that need only
// the CUDA runtime, taking the raw-pointer arguments of csrc/common/cross_entropy_args.h and a
// stream. They return the launch's error (cudaSuccess when it was queued).
#pragma once

#include <cuda_runtime.h>

#include "../common/cross_entropy_args.h"

extern "C" {

// Row losses, lse and coef; also the gradient (times args->scale[0]) when args->grad is set,
// possibly in place over the logits. Persistent when writing the gradient: at most as many
// rows in flight as fit in L2, so the second sweep of each row reads L2, not HBM.
cudaError_t fusedls_cross_entropy_forward_cuda(const fusedls::CrossEntropyArgs* args, cudaStream_t stream);

// dL/dlogits (and dL/dtarget when args->grad_target is set) from the saved lse / coef.
cudaError_t fusedls_cross_entropy_backward_cuda(const fusedls::CrossEntropyArgs* args, cudaStream_t stream);

// args->grad *= args->scale row by row, skipping (on the device) rows whose factor is 1.
cudaError_t fusedls_cross_entropy_scale_grad_cuda(const fusedls::CrossEntropyArgs* args, cudaStream_t stream);

}  // extern "C"
