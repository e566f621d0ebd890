"""Dtype and layout rules shared by every op and backend."""

from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """Accumulation dtype of a tensor or dtype: fp32, or fp64 for fp64 (which runs eagerly)."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.promote_types(dtype, torch.float32)


def is_dense(t: torch.Tensor) -> bool:
    """Its elements fill ``numel`` consecutive slots from ``data_ptr()`` (strides are never
    negative in torch): contiguous in some dimension order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True
