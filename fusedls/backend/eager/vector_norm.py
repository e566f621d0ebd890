"""Eager (pure PyTorch) backend of ``vector_norm``; the interface of fusedls/backend/triton/vector_norm.py.

Sums are scaled as in the kernels, two-pass max-then-scaled-sum: ``r = max |x|`` (min for
p < 0) and ``norm = r * (sum (|x| / r)^p)^(1/p)``, an element equal to r contributing exactly 1
(which also covers r = 0 and r = inf), in the accumulation dtype of ``norm`` (fp32, or fp64 for
fp64, which only this backend takes). No term overflows or underflows where the norm itself does
not (fp32 values near 1e30 or 1e-30 included). Shortcut: fp32 / fp16 / bf16 data with
|p| <= 6 is summed by torch in float64, where no such term can over- or underflow (6 * 128 < 1022
binary orders of magnitude), at a fraction of the cost. The gradient formulas are those of the
kernels' module docstring.
"""

from __future__ import annotations

import math

import torch

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op


# |x|^p of any fp32 value, and sums of up to 2^60 of them, are normal float64 numbers for |p| <= 6.
_FP64_SAFE_ORDER = 6.0


def _fp64_is_safe(rows: torch.Tensor, ord: float) -> bool:
    return rows.dtype != torch.float64 and abs(ord) <= _FP64_SAFE_ORDER


def _is_max(ord: float) -> bool:
    return math.isinf(ord)


def vector_norm_forward(
    rows: torch.Tensor,
    ord: float,
    out: torch.Tensor,
    norm: torch.Tensor,
    count: torch.Tensor,
) -> None:
    """Norm of each row of ``rows`` (R, N), N >= 1: written into ``out`` (R,) in the output
    dtype and ``norm`` (R,) in the accumulation dtype; for ord +-inf the number of elements tied
    at the norm goes into ``count`` (R,) when it is not empty (unused otherwise)."""
    if rows.shape[0] == 0:
        return
    a = rows.to(norm.dtype).abs() if ord == 0 or _is_max(ord) or not _fp64_is_safe(rows, ord) else None
    if ord == 0:
        result = (a != 0).sum(1, dtype=norm.dtype)  # NaN != 0: counted, as in torch
    elif _is_max(ord):
        result = a.amax(1) if ord > 0 else a.amin(1)  # both propagate NaN
        if count.numel():
            count.copy_((a == result[:, None]).sum(1, dtype=norm.dtype))
    elif a is None:
        result = torch.linalg.vector_norm(rows, ord, dim=1, dtype=torch.float64)
    else:
        r = (a.amax(1) if ord > 0 else a.amin(1))[:, None]  # NaN gives NaN everywhere below
        t = torch.where(a == r, 1.0, a / r)
        if ord == 1:
            s = t.sum(1)
        elif ord == 2:
            s = t.square().sum(1).sqrt()
        else:
            s = t.pow(ord).sum(1).pow(1.0 / ord)
        result = r[:, 0] * s
    norm.copy_(result)
    out.copy_(result)


def vector_norm_backward(
    grad: torch.Tensor,
    rows: torch.Tensor,
    norm: torch.Tensor,
    count: torch.Tensor,
    ord: float,
    dx: torch.Tensor,
) -> None:
    """Writes d(sum_i grad_i norm_i)/d rows into ``dx`` (R, N); ``norm`` / ``count`` from
    :func:`vector_norm_forward`; ord != 0."""
    acc = norm.dtype
    x = rows.to(acc)
    g = grad.to(acc)[:, None]
    n = norm[:, None]
    sgn = x.sign()  # sign(NaN) = 0, as torch's sgn in its backward
    if _is_max(ord):
        result = torch.where(x.abs() == n, sgn * (g / count[:, None]), 0.0)
    elif ord == 1:
        result = sgn * g
    else:
        # torch's 0 at x == 0 is 0 * a row factor: NaN when n is NaN, or for p < 1 infinite
        zero = (x == 0) & (~n.isnan() if ord > 1 else n.isfinite())
        ratio = x / n if ord == 2 else sgn * (x.abs() / n).pow(ord - 1)
        result = torch.where(zero, 0.0, ratio * g)
    dx.copy_(result)
