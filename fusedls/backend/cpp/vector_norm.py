"""``cpp`` backend of ``vector_norm``: the C++ kernels of ``csrc/cpu/vector_norm.cpp``.

Same interface and contract as ``fusedls/backend/eager/vector_norm.py`` (read it; the math is in
``fusedls/backend/triton/vector_norm.py``). ord 1, 2, inf and -inf run in C++: fp32 accumulation for
fp32 / bf16 / fp16 rows, ord 1 and 2 scaled by an exact power of two near the largest |x| (no
overflow of squares near 1e30 nor underflow near 1e-30), one sweep of each row for ord 1 and 2
(two for +-inf: the extreme, then its ties), one for the gradient, rows spread over torch's
intra-op threads (``torch.set_num_threads``), deterministic. The other orders (0 and general p)
are handed to the eager functions, as are fp64 rows (which the op already sends to eager).
"""

from __future__ import annotations

import math

import torch

from ..eager import vector_norm as _eager
from ._library import LIBRARY

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op


def _native(rows: torch.Tensor, ord: float) -> bool:
    """Whether the C++ kernels take this call (else the eager functions do)."""
    return rows.dtype in (torch.float32, torch.bfloat16, torch.float16) and (ord in (1.0, 2.0) or math.isinf(ord))


def vector_norm_forward(rows: torch.Tensor, ord: float, out: torch.Tensor, norm: torch.Tensor,
                        count: torch.Tensor) -> None:  # fmt: skip
    """See :func:`fusedls.backend.eager.vector_norm.vector_norm_forward`."""
    if rows.shape[0] == 0:
        return
    if not _native(rows, ord) or norm.dtype != torch.float32:
        _eager.vector_norm_forward(rows, ord, out, norm, count)
        return
    if math.isinf(ord) and count.numel() == 0:  # the tie counts are not wanted; the library writes them
        count = torch.empty_like(norm)
    LIBRARY.ops().vector_norm_forward(rows, float(ord), norm, count)
    if out is not norm:
        out.copy_(norm)


def vector_norm_backward(grad: torch.Tensor, rows: torch.Tensor, norm: torch.Tensor, count: torch.Tensor,
                         ord: float, dx: torch.Tensor) -> None:  # fmt: skip
    """See :func:`fusedls.backend.eager.vector_norm.vector_norm_backward`."""
    if not _native(rows, ord) or norm.dtype != torch.float32:
        _eager.vector_norm_backward(grad, rows, norm, count, ord, dx)
        return
    if grad.dtype != torch.float32 or not grad.is_contiguous():
        grad = grad.to(torch.float32).contiguous()
    LIBRARY.ops().vector_norm_backward(grad, rows, norm, count, float(ord), dx)
