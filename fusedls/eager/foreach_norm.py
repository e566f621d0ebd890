"""Eager (pure PyTorch, ``torch._foreach_*``) backend of the multi-tensor norms, clipping and
penalties, with the interface of ``fusedls/kernels/foreach_norm.py``.

Precision: norms are accumulated in fp64 (``torch._foreach_norm(..., dtype=torch.float64)``),
which is what makes them overflow-safe here (fp32 gradients of 1e30 square to 1e60, finite in
fp64) instead of the kernels' scaling; results are returned in the accumulation dtype of the
inputs (fp32, or fp64 for fp64 tensors). One ``_foreach_*`` call per dtype group (torch groups
internally too).
"""

from __future__ import annotations

import torch

from .._dtypes import acc_dtype


def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _norms64(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float64))


def foreach_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """(n,) norm of each tensor, fp32 (fp64 when a tensor is fp64)."""
    return _norms64(tensors, ord).to(_result_dtype(tensors))


def total_norm(
    tensors: list[torch.Tensor], ord: float, norm_of_norms: bool = False, max_norm: float | None = None,
    square: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norm of all ``tensors`` together (``square``: squared), and the clipping coefficient
    ``min(max_norm / (total + 1e-6), 1)`` when ``max_norm`` is given (as the kernels)."""
    norms = _norms64(tensors, ord)
    if ord == 0 and not norm_of_norms:  # the count of all non-zeros, not of non-zero tensors
        total = norms.sum()
    else:
        total = torch.linalg.vector_norm(norms, ord)
    if square:
        total = total * total
    total = total.to(_result_dtype(tensors))
    coef = None if max_norm is None else torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, coef


def scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """``t *= coef`` for every tensor, in place."""
    torch._foreach_mul_(tensors, coef)


def penalty(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
    """``sum |w|`` ("l1") or ``sum w^2`` ("l2") over every tensor, fp32 (fp64 for fp64)."""
    return total_norm(tensors, 1.0 if kind == "l1" else 2.0, square=kind == "l2")[0]


def penalty_backward(tensors: list[torch.Tensor], grad: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """``grad * sign(w)`` ("l1") or ``grad * 2w`` ("l2"), computed in the accumulation dtype."""
    grads = []
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        acc = [t.to(acc_dtype(t)) for t in group]
        factors = torch._foreach_sign(acc) if kind == "l1" else torch._foreach_mul(acc, 2.0)
        grads.append(dict(zip(map(id, group), (f.mul_(grad).to(dtype) for f in factors))))
    merged = {k: v for g in grads for k, v in g.items()}
    return [merged[id(t)] for t in tensors]
