"""``cuda`` backend of ``cross_entropy``: the CUDA kernels of ``csrc/cuda/cross_entropy.cu``.

Same interface and contract as ``fusedls/backend/eager/cross_entropy.py``, and the single-read design
of the Triton kernels (``fusedls/backend/triton/cross_entropy.py``): forward writes the gradient for
mean / sum (rows in flight capped to fit in L2), backward rescales it in place on the device.
Out-of-range class ids give NaN rows without a host synchronisation.
"""

from __future__ import annotations

from .. import _native
from ._library import LIBRARY

UNSUPPORTED = frozenset({"z_loss", "softcap", "return_lse", "return_accuracy"})

# The CUDA kernels sweep rows in 16-byte packs spread over the thread block; they take no
# chunk size (the argument is passed as 0).
cross_entropy_forward, cross_entropy_backward, cross_entropy_scale_grad_ = _native.cross_entropy_functions(
    LIBRARY, lambda: 0
)
