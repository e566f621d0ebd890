"""Dtype rules shared by every op."""

from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """Accumulation dtype of a tensor or dtype: fp32, or fp64 for fp64 (which runs eagerly)."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.promote_types(dtype, torch.float32)
