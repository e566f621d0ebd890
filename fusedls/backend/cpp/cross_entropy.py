"""``cpp`` backend of ``cross_entropy``: the C++ kernels of ``csrc/cpu/cross_entropy.cpp``.

Same interface and contract as ``fusedls/backend/eager/cross_entropy.py`` (read it; the math is in
``fusedls/backend/triton/cross_entropy.py``): fp32 statistics for fp32 / bf16 / fp16 logits, one
sweep of each row for the statistics and one for the gradient, rows spread over torch's
intra-op threads (``torch.set_num_threads``). Out-of-range class ids never reach the kernels
on CPU (fusedls/ops/cross_entropy.py raises first); the kernels would give NaN rows.
"""

from __future__ import annotations

from .. import _native
from ._library import LIBRARY

UNSUPPORTED = frozenset({"z_loss", "softcap", "return_lse", "return_accuracy"})

# Tuning: classes per block of a row sweep (rounded down to whole vector steps); 0 is the
# kernels' default (4096: 16 KB of fp32 per block, which stays in L1 between a block's two
# passes). Tests lower it so small vocabularies span several blocks.
BLOCK_C = 0

cross_entropy_forward, cross_entropy_backward, cross_entropy_scale_grad_ = _native.cross_entropy_functions(
    LIBRARY, lambda: BLOCK_C
)
