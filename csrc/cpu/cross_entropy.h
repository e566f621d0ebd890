// CPU cross-entropy kernels (csrc/cpu/cross_entropy.cpp). That file is compiled once per
// library variant with that variant's instruction-set flags (DEFAULT, AVX2, AVX512; see
// fusedls/cpp/_build.py), so these entry points exist once in each library.
#pragma once

#include "../common/cross_entropy_args.h"

namespace fusedls {
namespace cpu {

// Row losses, lse and coef of every row; also the gradient (times args.scale[0]) when
// args.grad is not null, possibly in place over the logits.
void cross_entropy_forward(const CrossEntropyArgs& args);

// dL/dlogits into args.grad from the saved lse / coef (and dL/dtarget into args.grad_target
// when it is not null); args.scale holds the upstream factor of each row.
void cross_entropy_backward(const CrossEntropyArgs& args);

// args.grad *= args.scale row by row, rows whose factor is exactly 1 untouched.
void cross_entropy_scale_grad(const CrossEntropyArgs& args);

// The instruction set this copy of the kernels was compiled for: "DEFAULT", "AVX2", "AVX512".
const char* capability();

}  // namespace cpu
}  // namespace fusedls
