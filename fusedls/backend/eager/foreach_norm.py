"""Eager (pure PyTorch, ``torch._foreach_*``) backend of the multi-tensor norms, clipping and
penalties, with the interface of ``fusedls/backend/triton/foreach_norm.py``.

Precision: p-norms are merged in fp64, and any part whose fp32 norm overflows or underflows is
redone in fp64 (fp32 gradients of 1e30 square to 1e60, finite in fp64) instead of the kernels'
scaling (see ``_norms64``); results are returned in the accumulation dtype of the inputs (fp32,
or fp64 for fp64 tensors). One ``_foreach_*`` call for all the tensors (torch groups by dtype
internally).
"""

from __future__ import annotations

import math

import torch

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op



def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_CHUNK = 1 << 16  # CPU: elements per fp32 chunk norm


def _norms64(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """fp64 (n,) norms. max, min and counts are exact in the tensors' own dtype. On CPU, p-norms
    are fp32 norms of chunks of 2^16 elements (torch's fast path; a single fp32 sum over millions
    of elements is off by ~1e-4) merged in fp64, and the chunks whose fp32 norm overflowed or
    underflowed are redone in fp64 (reading their values there is no device synchronisation).
    Elsewhere (a GPU running this backend for fp64 tensors or by request): fp64 throughout."""
    if ord in (0.0, math.inf, -math.inf):
        return torch.stack(torch._foreach_norm(tensors, ord)).double()
    if tensors[0].device.type != "cpu" or any(t.dtype == torch.float64 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float64))
    # fp32 copies of half tensors: torch's dtype=float32 path is ~100x slower than converting
    chunks = [t.reshape(-1).float().split(_CHUNK) for t in tensors]
    flat = [c for cs in chunks for c in cs]
    if not flat:
        return torch.zeros(len(tensors), dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(flat, ord)).double()
    for i in (~torch.isfinite(norms) | (norms < 1e-15)).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(flat[i].double(), ord)
    owner = torch.tensor([i for i, cs in enumerate(chunks) for _ in cs])
    powered = torch.zeros(len(tensors), dtype=torch.float64).index_add_(0, owner, norms.pow(ord))
    return powered.pow(1.0 / ord)


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
    """``grad * sign(w)`` ("l1") or ``grad * 2w`` ("l2") in each tensor's dtype (torch's
    ``_foreach_mul`` by a tensor computes in fp32 for half dtypes and rounds once)."""
    if kind == "l1":
        grads = torch._foreach_sign(tensors)
        torch._foreach_mul_(grads, grad)
        return grads
    return torch._foreach_mul(tensors, 2.0 * grad)
