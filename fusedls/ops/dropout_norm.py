"""``dropout_add_rms_norm`` and ``dropout_add_layer_norm``: ``h = residual + dropout(x)`` and the
norm of ``h`` in one pass, forward and backward; the public functions, their autograd Function and
custom ops. The mask, the seed and the argument checks are ``dropout.py``'s.

:class:`DropoutAddNormFunction` saves ``h``, the fp32 row statistics and the 8-byte seed: no mask.
The backends are ``DropoutBackend`` modules (``fusedls/backend/protocols.py``); a backend whose
kernel cannot take rows this long says so (``dropout_add_norm_unsupported``) and ``auto`` runs them
eagerly.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._tensors import acc_dtype
from ..backend import registry
from ._custom_op import custom_op
from .dropout import _check_p, _check_vector, _check_x_residual, _draw_seed, _impl, _promote


def _norm_stats(x: torch.Tensor, h_dtype: torch.dtype, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.empty(x.shape[0], device=x.device, dtype=acc_dtype(h_dtype))
    return rstd.new_empty(0 if is_rms else x.shape[0]), rstd


@custom_op("fusedls::dropout_add_norm_fwd", mutates_args=())
def _dropout_add_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    p: float,
    eps: float,
    is_rms: bool,
    h_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd) of (R, N) rows; mean is empty for RMSNorm; no dropout if seed is None."""
    y = torch.empty(x.shape, device=x.device, dtype=h_dtype)
    h = torch.empty_like(y)
    mean, rstd = _norm_stats(x, h_dtype, is_rms)
    _impl(backend).dropout_add_norm_forward(x, residual, weight, bias, seed, p, eps, is_rms, y, h, mean, rstd)
    return y, h, mean, rstd


@_dropout_add_norm_fwd.register_fake
def _(x, residual, weight, bias, seed, p, eps, is_rms, h_dtype, backend):
    y = torch.empty(x.shape, device=x.device, dtype=h_dtype)
    return (y, torch.empty_like(y), *_norm_stats(x, h_dtype, is_rms))


def _norm_grads(h, weight, x_dtype, residual_dtype, has_bias):
    dx = torch.empty(h.shape, device=h.device, dtype=x_dtype)
    dres = torch.empty(h.shape, device=h.device, dtype=residual_dtype) if residual_dtype is not None else None
    dw = torch.empty(h.shape[1], device=h.device, dtype=acc_dtype(h.dtype)) if weight is not None else None
    db = torch.empty(h.shape[1], device=h.device, dtype=acc_dtype(h.dtype)) if has_bias else None
    return dx, dres, dw, db


def _or_empty(h, *grads):
    """The optional gradients as tensors (empty for None), as a custom op must return them."""
    return tuple(h.new_empty(0) if g is None else g for g in grads)


@custom_op("fusedls::dropout_add_norm_bwd", mutates_args=())
def _dropout_add_norm_bwd(
    dy: torch.Tensor,
    dh_next: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: Optional[torch.Tensor],
    p: float,
    is_rms: bool,
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
    has_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dbias); those not wanted are empty; fp32 dweight, dbias."""
    dx, dres, dw, db = _norm_grads(h, weight, x_dtype, residual_dtype, has_bias)
    _impl(backend).dropout_add_norm_backward(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, dx, dres, dw, db)
    return (dx, *_or_empty(h, dres, dw, db))


@_dropout_add_norm_bwd.register_fake
def _(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, x_dtype, residual_dtype, has_bias, backend):
    dx, dres, dw, db = _norm_grads(h, weight, x_dtype, residual_dtype, has_bias)
    return (dx, *_or_empty(h, dres, dw, db))


class DropoutAddNormFunction(torch.autograd.Function):
    """(y, h) of (R, N) rows: ``h = residual + dropout(x)``, ``y = norm(h) * weight + bias``.

    forward(x, residual, weight, bias, seed, p, eps, is_rms, backend); seed None means no dropout,
    weight None a weight of ones, bias None no bias.
    Saves h, the fp32 row statistics and the seed; backward regenerates the mask (the
    derivation is in fusedls/backend/triton/dropout.py).
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, seed, p, eps, is_rms, backend):
        h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        y, h, mean, rstd = _dropout_add_norm_fwd(x, residual, weight, bias, seed, p, eps, is_rms, h_dtype, backend)
        ctx.save_for_backward(h, weight, mean, rstd, seed)
        ctx.args = (p, is_rms, x.dtype, residual.dtype if residual is not None else None, bias is not None, backend)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_next):
        h, weight, mean, rstd, seed = ctx.saved_tensors
        p, is_rms, x_dtype, residual_dtype, has_bias, backend = ctx.args
        if dy is None:
            dy = torch.zeros_like(h)
        dh_next = dh_next.contiguous() if dh_next is not None else None
        dx, dres, dw, db = _dropout_add_norm_bwd(
            dy.contiguous(), dh_next, h, weight, mean, rstd, seed, p, is_rms, x_dtype, residual_dtype, has_bias, backend
        )
        return (
            dx,
            dres if residual_dtype is not None else None,
            dw.to(ctx.weight_dtype) if weight is not None else None,
            db.to(ctx.bias_dtype) if has_bias else None,
            *(None,) * 5,
        )


def _dropout_add_norm(x, residual, weight, bias, p, eps, training, generator, is_rms):
    _check_x_residual(x, residual)
    n = x.shape[-1]
    _check_vector("weight", weight, n, x)
    _check_vector("bias", bias, n, x)
    p = _check_p(p, training)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    widest = max(t.element_size() for t in (x, residual) if t is not None)
    backend = registry.resolve(
        x.device, _promote(x, residual, weight, bias), "dropout",
        fits=lambda impl: impl.dropout_add_norm_unsupported(n, widest),
    )  # fmt: skip
    seed = _draw_seed(x, generator) if training and p > 0.0 else None
    rows = x.reshape(-1, n).contiguous()
    res = residual.reshape(-1, n).contiguous() if residual is not None else None
    y, h = DropoutAddNormFunction.apply(
        rows, res, weight.contiguous() if weight is not None else None, bias.contiguous() if bias is not None else None,
        seed, p, float(eps), is_rms, backend,
    )  # fmt: skip
    return y.reshape(x.shape), h.reshape(x.shape)


def dropout_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    p: float,
    eps: float = 1e-6,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + dropout(x)``, ``y = F.rms_norm(h, (N,), weight, eps)``; returns ``(y, h)``.

    ``residual=None`` gives ``h = dropout(x)``; ``weight=None`` normalises without a weight, as
    ``F.rms_norm`` does. ``h`` and ``y`` have torch's promotion of x and residual; statistics in
    fp32. Gradients for x, residual and weight.
    """
    return _dropout_add_norm(x, residual, weight, None, p, eps, training, generator, True)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    eps: float = 1e-5,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + dropout(x)``, ``y = F.layer_norm(h, (N,), weight, bias, eps)``; returns ``(y, h)``.

    As :func:`dropout_add_rms_norm`, with mean subtraction; ``weight`` and ``bias`` are optional,
    as in ``F.layer_norm``.
    """
    return _dropout_add_norm(x, residual, weight, bias, p, eps, training, generator, False)
