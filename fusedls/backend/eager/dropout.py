"""Eager (pure PyTorch) backend of dropout, dropout_add and dropout + add + RMSNorm/LayerNorm.

Same interface and formulas as ``fusedls/backend/triton/dropout.py`` (read its module docstring for the
derivations): ``x * m`` with ``m = 1/(1-p)`` where kept and 0 where dropped, computed in fp32
(fp64 for fp64 tensors, which only this backend takes) and rounded once; norm statistics in
that precision.

Masks. Element ``i`` is kept iff ``u_i >= p`` with ``u = torch.rand(shape, generator=g)`` and
``g`` a fresh generator seeded with the op's int64 seed (drawn from torch's generator, as for the
kernels). Backward builds the same generator again, so this backend stores no mask either. Its
bits differ from the kernels' Philox bits (same distribution, another stream), and reading the
seed is a host synchronisation when the eager backend runs on a GPU (fp64, or when asked for).
"""

from __future__ import annotations

import torch

from ..._tensors import acc_dtype

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op



def _factor(seed: torch.Tensor, shape: torch.Size, p: float, device: torch.device, acc: torch.dtype) -> torch.Tensor:
    """``m``: 1/(1-p) where kept, 0 where dropped (0 everywhere when p == 1)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return (u >= p).to(acc) * scale


def _dropout_add(x, bias, residual, seed, p, acc) -> torch.Tensor:
    """``residual + (x + bias) * m`` in ``acc`` (no dropout when seed is None)."""
    v = x.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    if seed is not None:
        v = v * _factor(seed, x.shape, p, x.device, acc)
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
    """Writes ``residual + (x + bias) * m`` into ``out`` (all contiguous, x's shape; bias (N,))."""
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
        dh = dh * _factor(seed, h.shape, p, h.device, acc)
    dx.copy_(dh)
