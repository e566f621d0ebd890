"""Eager (pure PyTorch) backend of dropout, dropout_add and dropout + add + RMSNorm/LayerNorm.

A ``DropoutBackend`` (``fusedls/backend/protocols.py``) with the formulas of
``fusedls/backend/triton/dropout.py`` (read its module docstring for the derivations): ``x * m``
with ``m = 1/(1-p)`` where kept and 0 where dropped, computed in fp32 (fp64 for fp64 tensors, which
only this backend takes) and rounded once; norm statistics in that precision.

Masks: the same bits as the kernels (:func:`keep_mask`: Philox-4x32-10 keyed by the seed, one
counter per 8 elements of a row), computed with int64 tensor arithmetic on the device of the data,
so no mask is stored and none depends on the backend.
"""

from __future__ import annotations

import torch

from ..._tensors import acc_dtype
from ..protocols import dropout_threshold

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Philox-4x32 key increments (Weyl sequence)
PHILOX_ROUNDS = 10
ELEMENTS_PER_COUNTER = 8  # four 32-bit words, two 16-bit draws each


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product ``a * b`` (a, b < 2^32) without leaving
    int64: ``b`` is split in 16-bit halves so no partial product reaches 2^63."""
    t1 = (b & 0xFFFF) * a  # < 2^48
    t2 = (b >> 16) * a  # < 2^48; a * b = t2 * 2^16 + t1
    hi = (t2 + (t1 >> 16)) >> 16
    lo = (((t2 & 0xFFFF) << 16) + t1) & _M32
    return hi, lo


def philox4x32(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of counters ``(counter mod 2^32, counter >> 32, 0, 0)`` under the key ``(seed
    mod 2^32, seed >> 32)``: the four 32-bit words (int64 tensors of ``counter``'s shape), the same
    as triton's ``tl.randint4x(seed, counter)``."""
    k0 = (seed & _M32).to(torch.int64)
    k1 = ((seed >> 32) & _M32).to(torch.int64)
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(PHILOX_ROUNDS):
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def keep_mask(seed: torch.Tensor, rows: slice, n_cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The kernels' mask of rows ``rows`` of an ``(R, n_cols)`` tensor: element ``(r, c)`` draws the
    16-bit half ``c % 2`` of word ``(c % 8) // 2`` of Philox counter ``r * ceil(n_cols / 8) + c // 8``
    and is kept iff that draw is ``>= dropout_threshold(p)``."""
    groups = -(-n_cols // ELEMENTS_PER_COUNTER)
    r = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int64)
    counter = r[:, None] * groups + torch.arange(groups, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(seed.to(device), counter), dim=-1)  # (r, groups, 4)
    draws = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(len(r), groups * ELEMENTS_PER_COUNTER)
    return draws[:, :n_cols] >= dropout_threshold(p)


def _factor(seed: torch.Tensor, n_rows: int, n_cols: int, p: float, device, acc) -> torch.Tensor:
    """``m`` of ``(n_rows, n_cols)``: 1/(1-p) where kept, 0 where dropped (0 everywhere when p == 1)."""
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return keep_mask(seed, slice(0, n_rows), n_cols, p, device).to(acc) * scale


def _dropout_add(x, bias, residual, seed, p, acc) -> torch.Tensor:
    """``residual + (x + bias) * m`` of rows of the last dimension, in ``acc`` (no dropout when
    seed is None)."""
    v = x.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    if seed is not None:
        n_cols = x.shape[-1] if x.dim() else 1
        v = v * _factor(seed, x.numel() // max(n_cols, 1), n_cols, p, x.device, acc).view(x.shape)
    if residual is not None:
        v = v + residual.to(acc)
    return v


def dropout_forward(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    seed: torch.Tensor,
    p: float,
    out: torch.Tensor,
) -> None:
    """Writes ``residual + (x + bias) * m`` into ``out`` (contiguous, x's shape; bias (N,))."""
    out.copy_(_dropout_add(x, bias, residual, seed, p, torch.promote_types(acc_dtype(x), out.dtype)))


def dropout_add_norm_unsupported(n_cols: int, element_size: int) -> str:
    """Any row length: "" (the eager backend has no limit)."""
    return ""


def dropout_add_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    eps: float,
    is_rms: bool,
    y: torch.Tensor,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """Writes y, h (R, N) and the row statistics mean (LayerNorm only) and rstd."""
    acc = torch.promote_types(acc_dtype(x), h.dtype)
    h.copy_(_dropout_add(x, None, residual, seed, p, acc))
    hf = h.to(acc)  # the rounded h, as the kernel normalises it
    if not is_rms:
        mu = hf.mean(1)
        mean.copy_(mu)
        hf = hf - mu[:, None]
    r = torch.rsqrt((hf * hf).mean(1) + eps)
    rstd.copy_(r)
    out = hf * r[:, None]
    if weight is not None:
        out = out * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    y.copy_(out)


def dropout_add_norm_backward(
    dy: torch.Tensor,
    dh_next: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    is_rms: bool,
    dx: torch.Tensor,
    dresidual: torch.Tensor | None,
    dweight: torch.Tensor | None,
    dbias: torch.Tensor | None,
) -> None:
    """Writes dx, dresidual (if given) and the (N,) sums dweight, dbias (if given)."""
    acc = acc_dtype(h)
    n_cols = h.shape[1]
    xhat = h.to(acc)
    if not is_rms:
        xhat = xhat - mean.to(acc)[:, None]
    xhat = xhat * rstd.to(acc)[:, None]
    g_y = dy.to(acc)
    if dweight is not None:
        dweight.copy_((g_y * xhat).sum(0))
    if dbias is not None:
        dbias.copy_(g_y.sum(0))
    g = g_y * weight.to(acc) if weight is not None else g_y
    dh = g - xhat * ((g * xhat).sum(1, keepdim=True) / n_cols)
    if not is_rms:
        dh = dh - g.sum(1, keepdim=True) / n_cols
    dh = dh * rstd.to(acc)[:, None]
    if dh_next is not None:
        dh = dh + dh_next.to(acc)
    if dresidual is not None:
        dresidual.copy_(dh)
    if seed is not None:
        dh = dh * _factor(seed, h.shape[0], h.shape[1], p, h.device, acc)
    dx.copy_(dh)
