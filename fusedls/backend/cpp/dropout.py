"""``cpp`` backend of dropout, dropout_add and dropout + add + RMSNorm / LayerNorm: the C++ kernels of
``csrc/cpu/dropout.cpp``.

A ``DropoutBackend`` (``fusedls/backend/protocols.py``) drawing the same mask bits as the Triton
kernels and the eager backend (Philox-4x32-10, one counter per 8 elements of a row): one C++ call
per forward or backward, rows spread over torch's intra-op threads, fp32 arithmetic rounded once,
weight and bias gradients summed in a fixed order. Calls whose tensors are not all of one dtype
(fp32, bf16 or fp16) are handed to the eager functions, which draw the same mask.
"""

from __future__ import annotations

import torch

from ..eager import dropout as _eager
from ..protocols import dropout_threshold
from ._library import LIBRARY

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native(first: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the C++ kernels take these tensors: one dtype of theirs (None skipped)."""
    dtype = first.dtype
    if dtype not in _DTYPES:
        return False
    for t in others:
        if t is not None and t.dtype != dtype:
            return False
    return True


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_forward(x, bias, residual, seed, p, out) -> None:
    """See ``DropoutBackend.dropout_forward``."""
    if not _native(x, bias, residual, out):
        _eager.dropout_forward(x, bias, residual, seed, p, out)
        return
    LIBRARY.ops().dropout_forward(x, bias, residual, seed, dropout_threshold(p), _scale(p), out)


def dropout_add_norm_unsupported(n_cols: int, element_size: int) -> str:
    """Any row length: "" (the kernels sweep a row in place)."""
    return ""


def dropout_add_norm_forward(x, residual, weight, bias, seed, p, eps, is_rms, y, h, mean, rstd) -> None:
    """See ``DropoutBackend.dropout_add_norm_forward``."""
    if not _native(x, residual, weight, bias, y, h) or rstd.dtype != torch.float32:
        _eager.dropout_add_norm_forward(x, residual, weight, bias, seed, p, eps, is_rms, y, h, mean, rstd)
        return
    LIBRARY.ops().dropout_add_norm_forward(x, residual, weight, bias, seed, dropout_threshold(p), _scale(p), eps,
                                           is_rms, y, h, mean, rstd)  # fmt: skip


def dropout_add_norm_backward(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, dx, dresidual, dweight,
                              dbias) -> None:  # fmt: skip
    """See ``DropoutBackend.dropout_add_norm_backward``."""
    if not _native(h, dy, dh_next, weight, dx, dresidual) or rstd.dtype != torch.float32:
        _eager.dropout_add_norm_backward(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, dx, dresidual, dweight,
                                         dbias)  # fmt: skip
        return
    LIBRARY.ops().dropout_add_norm_backward(dy, dh_next, h, weight, mean, rstd, seed, dropout_threshold(p), _scale(p),
                                            is_rms, dx, dresidual, dweight, dbias)  # fmt: skip
