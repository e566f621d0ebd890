"""``vector_norm``: the public function, its autograd Function and its custom ops.

Layers (one name, ``vector_norm``, at each):

* :func:`vector_norm` checks the arguments as torch does (metadata only), moves the reduced
  dimensions to the end and views the input as ``(R, N)`` rows (a view, no copy, when they are
  already innermost and contiguous), applies :class:`VectorNormFunction`, and reshapes the
  ``(R,)`` result to torch's output shape;
* :class:`VectorNormFunction` saves what backward needs (the rows, the fp32 norms and, for
  ord +-inf, the tie counts);
* the ``fusedls::vector_norm_*`` custom ops (opaque to ``torch.compile``) run one backend:
  ``fusedls/backend/triton/vector_norm.py`` (triton) or ``fusedls/backend/eager/vector_norm.py`` (eager).

Errors follow torch's classes, so code catching torch's keeps working: TypeError for an ord that
is not a real number or a dim that is not an int; IndexError for a dim out of range; RuntimeError
for a repeated dim, a non-floating input, an unusable ``dtype``, and ord < 0 or +-inf over an
empty reduction. Complex inputs, and ord = NaN, are handed to ``torch.linalg.vector_norm``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

from ..backend import registry
from .._tensors import acc_dtype
from ._checks import check_tensor
from ._custom_op import custom_op


def _impl(backend: str):
    return registry.implementation("vector_norm", backend)


def _is_max(ord: float) -> bool:
    return math.isinf(ord)


def _count(rows: torch.Tensor, ord: float, acc: torch.dtype, ties: bool) -> torch.Tensor:
    # The tie counts of ord +-inf, only for a backward (counting them costs the Triton kernel
    # about as much again: it is compute-bound then); empty otherwise.
    return rows.new_empty(rows.shape[0] if _is_max(ord) and ties else 0, dtype=acc)


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::vector_norm_fwd", mutates_args=())
def _vector_norm_fwd(
    rows: torch.Tensor, ord: float, out_dtype: torch.dtype, acc: torch.dtype, ties: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm in out_dtype, norm in acc (empty when that is out_dtype: ``out`` holds it), tie counts
    (ord +-inf and ``ties``; else empty)) of each row."""
    out = rows.new_empty(rows.shape[0], dtype=out_dtype)
    norm = rows.new_empty(rows.shape[0] if acc != out_dtype else 0, dtype=acc)
    count = _count(rows, ord, acc, ties)
    if rows.shape[1] == 0:  # ord >= 0 here (the op layer raises otherwise): the norm of nothing is 0
        out.zero_(), norm.zero_()
    else:
        _impl(backend).vector_norm_forward(rows, ord, out, out if acc == out_dtype else norm, count)
    return out, norm, count


@_vector_norm_fwd.register_fake
def _(rows, ord, out_dtype, acc, ties, backend):
    norm = rows.new_empty(rows.shape[0] if acc != out_dtype else 0, dtype=acc)
    return rows.new_empty(rows.shape[0], dtype=out_dtype), norm, _count(rows, ord, acc, ties)


@custom_op("fusedls::vector_norm_bwd", mutates_args=())
def _vector_norm_bwd(
    grad: torch.Tensor, rows: torch.Tensor, norm: torch.Tensor, count: torch.Tensor, ord: float, backend: str
) -> torch.Tensor:
    """d(sum_i grad_i norm_i)/d rows, contiguous, in rows' dtype."""
    dx = torch.empty_like(rows, memory_format=torch.contiguous_format)
    _impl(backend).vector_norm_backward(grad, rows, norm, count, ord, dx)
    return dx


@_vector_norm_bwd.register_fake
def _(grad, rows, norm, count, ord, backend):
    return torch.empty_like(rows, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- autograd Function


class VectorNormFunction(torch.autograd.Function):
    """Norm of each row of ``(R, N)`` rows (columns contiguous); forward(rows, ord,
    out_dtype, backend) returns ``(R,)`` in ``out_dtype``. ord 0 has no gradient (None, as torch)."""

    @staticmethod
    def forward(ctx, rows, ord, out_dtype, backend):
        grad = ord != 0 and ctx.needs_input_grad[0]
        acc = acc_dtype(out_dtype)
        out, norm, count = _vector_norm_fwd(rows, ord, out_dtype, acc, grad, backend)
        if grad:
            ctx.save_for_backward(rows, out if acc == out_dtype else norm, count)
        ctx.ord, ctx.backend = ord, backend
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None or ctx.ord == 0:
            return None, None, None, None
        rows, norm, count = ctx.saved_tensors
        return _vector_norm_bwd(grad, rows, norm, count, ctx.ord, ctx.backend), None, None, None


# ---------------------------------------------------------------------------- public function


def _check_ord(ord) -> float:
    if isinstance(ord, torch.Tensor) and ord.dim() == 0 and not ord.is_complex():
        ord = ord.item()  # as torch, which takes a Number
    if not isinstance(ord, Real):
        raise TypeError(f"vector_norm(): ord must be a real number (2, 1, inf, -inf, 0, or any float), got {ord!r}")
    return float(ord)


def _check_dims(dim, ndim: int) -> list[int]:
    """The reduced dimensions, normalised and ascending; None or () reduce every dimension."""
    if dim is None:
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) and not isinstance(dim, bool) else dim
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    ):
        raise TypeError(f"vector_norm(): dim must be None, an int or a tuple of ints, got {dim!r}")
    if len(dims) == 0:
        return list(range(ndim))
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    seen = []
    for d in dims:
        if not lo <= d <= hi:
            raise IndexError(f"vector_norm(): dim out of range (expected to be in range of [{lo}, {hi}], but got {d})")
        d = d % max(ndim, 1)
        if d in seen:
            raise RuntimeError(f"vector_norm(): dim {d} appears multiple times in the list of dims")
        seen.append(d)
    return sorted(d for d in seen if d < ndim)


def _check_dtype(x: torch.Tensor, dtype) -> torch.dtype:
    """The computation and output dtype: ``dtype`` if given, else x's (torch's rules)."""
    if not (x.is_floating_point() or x.is_complex()):
        raise RuntimeError(f"vector_norm(): input x must be a floating-point or complex tensor, got {x.dtype}")
    if dtype is None:
        return x.dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"vector_norm(): dtype must be a torch.dtype, got {dtype!r}")
    if not (dtype.is_floating_point or dtype.is_complex):
        raise RuntimeError(f"vector_norm(): dtype must be a floating-point or complex dtype, got {dtype}")
    if dtype.is_complex and not x.is_complex():
        raise RuntimeError(f"vector_norm(): dtype must be real for real input x, got {dtype}")
    if torch.promote_types(x.dtype, dtype) != dtype:
        raise RuntimeError(
            f"vector_norm(): x's dtype {x.dtype} must convert to dtype={dtype} without narrowing"
        )
    return dtype


def _empty_reduction(x: torch.Tensor, ord: float, dims: list[int], dim) -> None:
    # torch's rule: ord < 0 and +-inf have no identity, so an empty reduction is an error.
    if x.numel() != 0 or not (ord < 0 or _is_max(ord)):
        return
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):
        raise RuntimeError(f"vector_norm(): cannot compute the {ord} norm of an empty tensor: no identity")
    for d in dims:
        if x.shape[d] == 0:
            raise RuntimeError(
                f"vector_norm(): cannot compute the {ord} norm over dimension {d}, which is empty: no identity"
            )


def vector_norm(
    x: torch.Tensor,
    ord: float = 2,
    dim: int | Sequence[int] | None = None,
    keepdim: bool = False,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Drop-in for :func:`torch.linalg.vector_norm`, with fused kernels.

    Same arguments, output shape and dtype, values and gradients as torch: ``ord`` 2, 1, inf,
    -inf, 0 (the count of non-zeros, no gradient) or any other float (negative and fractional
    too); ``dim`` None / () (every dimension), an int or a tuple; ``keepdim``; ``dtype`` (the
    input is converted to it first; it must hold x's dtype without narrowing).

    Unlike torch, fp32 (and fp16/bf16) norms do not overflow or underflow in the middle of the
    computation: ``vector_norm(torch.full((4,), 1e30))`` is 2e30 (torch: inf), and values near
    1e-30 whose squares underflow give their true norm (torch: 0). Accumulation in fp32 (fp64 for
    fp64, computed eagerly); deterministic (the same bits on every run). Complex inputs and
    ord = NaN are passed to ``torch.linalg.vector_norm``.
    """
    check_tensor("x", x)
    ord = float(ord) if type(ord) in (int, float) else _check_ord(ord)
    out_dtype = x.dtype if dtype is None and x.is_floating_point() else _check_dtype(x, dtype)
    if x.is_complex() or ord != ord:  # NaN ord
        return torch.linalg.vector_norm(x, ord, dim, keepdim, dtype=dtype)
    if not isinstance(keepdim, bool):
        raise TypeError(f"vector_norm(): keepdim must be a bool, got {type(keepdim).__name__}")
    if dim is None and not keepdim:  # every dimension: one row, no permutation
        if x.numel() == 0 and (ord < 0 or _is_max(ord)):
            _empty_reduction(x, ord, list(range(x.dim())), dim)
        rows, shape = x.reshape(1, -1) if x.dim() != 2 or x.shape[0] != 1 else x, ()
    else:
        rows, shape = _as_rows(x, ord, dim, keepdim)
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        rows = rows.contiguous()
    backend = registry.resolve(x.device, out_dtype, "vector_norm")
    out = VectorNormFunction.apply(rows, ord, out_dtype, backend)
    return out if out.shape == shape else out.reshape(shape)


def _as_rows(x: torch.Tensor, ord: float, dim, keepdim: bool):
    """(``(R, N)`` rows of the reduced dimensions, the output shape) of a reduction over ``dim``."""
    dims = _check_dims(dim, x.dim())
    _empty_reduction(x, ord, dims, dim)
    kept = [d for d in range(x.dim()) if d not in dims]
    n_cols = math.prod([x.shape[d] for d in dims])
    shape = [1 if d in dims else x.shape[d] for d in range(x.dim())] if keepdim else [x.shape[d] for d in kept]
    rows = x.permute(kept + dims) if kept and dims and kept + dims != list(range(x.dim())) else x
    return rows.reshape(math.prod([x.shape[d] for d in kept]), n_cols), torch.Size(shape)
