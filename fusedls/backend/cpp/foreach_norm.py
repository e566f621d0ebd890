"""``cpp`` backend of the multi-tensor norms, clipping and penalties: the C++ kernels of
``csrc/cpu/foreach_norm.cpp``.

Same interface and contract as ``fusedls/backend/eager/foreach_norm.py`` (read it; the math is in
``fusedls/backend/triton/foreach_norm.py``). In C++, for lists of fp32 / bf16 / fp16 tensors (mixed
dtypes in one list are fine): the ord 1, 2 and inf norms (each tensor cut into blocks of
:data:`BLOCK` elements; fp32 block norms with sums scaled by a power of two, so squares of 1e30
or 1e-30 neither overflow nor underflow; merged per tensor in fp64 in block order, hence
deterministic and independent of the thread count), so also the penalties' forward (sum |w|,
sum w^2), their backward (grad sign(w), grad 2w) and ``scale_`` (in place). The (tensor, block)
pairs are spread over torch's intra-op threads, so many small tensors and a few large ones both
use them all. Handed to the eager functions: the other orders (0, -inf, general p), fp64
tensors (which the op already sends to eager), and tensors that are not dense.
"""

from __future__ import annotations

import math

import torch

from ..._tensors import is_dense
from ..eager import foreach_norm as _eager
from ._library import LIBRARY

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op

BLOCK = 1 << 16  # elements per work item (block norm, scaled element range); tests shrink it
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native(tensors: list[torch.Tensor], ord: float = 1.0) -> bool:
    """Whether the C++ kernels take this call (else the eager functions do)."""
    return (ord in (1.0, 2.0, math.inf) and all(t.dtype in _DTYPES and t.device.type == "cpu" for t in tensors)
            and all(t.is_contiguous() or is_dense(t) for t in tensors))  # fmt: skip


def _norms64(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """(n,) fp64 norms (ord 1, 2, inf)."""
    return LIBRARY.ops().foreach_norms(tensors, float(ord), BLOCK)


def foreach_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """See :func:`fusedls.backend.eager.foreach_norm.foreach_norms`."""
    if not _native(tensors, ord):
        return _eager.foreach_norms(tensors, ord)
    return _norms64(tensors, ord).float()


def total_norm(
    tensors: list[torch.Tensor], ord: float, norm_of_norms: bool = False, max_norm: float | None = None,
    square: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See :func:`fusedls.backend.eager.foreach_norm.total_norm` (the norm of the fp64 per-tensor norms)."""
    if not _native(tensors, ord):
        return _eager.total_norm(tensors, ord, norm_of_norms, max_norm, square)
    total = torch.linalg.vector_norm(_norms64(tensors, ord), ord)
    if square:
        total = total * total
    total = total.float()
    coef = None if max_norm is None else torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, coef


def scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """See :func:`fusedls.backend.eager.foreach_norm.scale_`."""
    if not _native(tensors) or coef.dtype != torch.float32 or coef.numel() != 1:
        _eager.scale_(tensors, coef)
        return
    if float(coef) == 1.0:  # x * 1 = x: a clip that clips nothing (a CPU tensor: reading it is free)
        return
    LIBRARY.ops().foreach_scale_(tensors, coef.contiguous(), BLOCK)


def penalty(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
    """See :func:`fusedls.backend.eager.foreach_norm.penalty`."""
    return total_norm(tensors, 1.0 if kind == "l1" else 2.0, square=kind == "l2")[0]


def penalty_backward(tensors: list[torch.Tensor], grad: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """See :func:`fusedls.backend.eager.foreach_norm.penalty_backward`."""
    if not _native(tensors) or grad.numel() != 1 or grad.dtype not in (torch.float32, torch.float64):
        return _eager.penalty_backward(tensors, grad, kind)
    return LIBRARY.ops().foreach_penalty_backward(tensors, grad.float().contiguous(), kind == "l2", BLOCK)
