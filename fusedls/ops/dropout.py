"""``dropout``, ``dropout_add`` and ``dropout_add_{rms,layer}_norm``: the public functions, their
autograd Functions, their custom ops and their modules.

Layers, as for ``cross_entropy``:

* the public functions check the arguments (metadata only), draw the seed, flatten to rows and
  apply an autograd Function;
* :class:`DropoutFunction` / :class:`DropoutAddNormFunction` save only the 8-byte seed (plus,
  for the norms, the returned h and fp32 row statistics): no mask, zero bytes per element;
* the ``fusedls::dropout_*`` custom ops (opaque to ``torch.compile``) run one backend:
  ``fusedls/kernels/dropout.py`` (triton) or ``fusedls/eager/dropout.py`` (eager).

Seeds. Each call with dropout active draws one int64 from torch's generator (the default one of
the input's device, or ``generator=``) as a device tensor, with no host synchronisation; the
kernels load it. So ``torch.manual_seed`` makes runs reproducible, consecutive calls draw
different masks, the generator advances by one draw per call (torch's own dropout advances it by
its element count), and under CUDA-graph capture the draw is a graph-safe RNG op whose value
changes on each replay. Backward regenerates the mask from the saved seed.
"""

from __future__ import annotations

from typing import Optional

import functools

import torch

from .. import _backend
from .._dtypes import acc_dtype
from ._custom_op import custom_op
from ._checks import check_floating, check_same_device, check_tensor, check_unit_interval

__all__ = [
    "Dropout", "DropoutAddLayerNorm", "DropoutAddNormFunction", "DropoutAddRMSNorm", "DropoutFunction",
    "dropout", "dropout_add", "dropout_add_layer_norm", "dropout_add_rms_norm",
]  # fmt: skip


def _impl(backend: str):
    return _backend.implementation("dropout", backend)



def _draw_seed(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One int64 seed from torch's generator, on the input's device, without a host sync."""
    return torch.randint(2**62, (), device=like.device, generator=generator, dtype=torch.int64)


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::dropout_fwd", mutates_args=())
def _dropout_fwd(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    seed: torch.Tensor,
    p: float,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """``residual + (x + bias) * m`` of contiguous x (and residual, same shape; bias (N,))."""
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    _impl(backend).dropout_forward(x, bias, residual, seed, p, out)
    return out


@_dropout_fwd.register_fake
def _(x, bias, residual, seed, p, out_dtype, backend):
    return torch.empty(x.shape, device=x.device, dtype=out_dtype)


@custom_op("fusedls::dropout_", mutates_args=("x",))
def _dropout_(x: torch.Tensor, seed: torch.Tensor, p: float, backend: str) -> None:
    """``x *= m`` in place (contiguous x): each element is read before it is overwritten."""
    _impl(backend).dropout_forward(x, None, None, seed, p, x)


@_dropout_.register_fake
def _(x, seed, p, backend):
    return None


def _norm_stats(x: torch.Tensor, h_dtype: torch.dtype, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.empty(x.shape[0], device=x.device, dtype=acc_dtype(h_dtype))
    return rstd.new_empty(0 if is_rms else x.shape[0]), rstd


@custom_op("fusedls::dropout_add_norm_fwd", mutates_args=())
def _dropout_add_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
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
    dw = torch.empty(weight.shape, device=h.device, dtype=acc_dtype(h.dtype))
    return dx, dres, dw, torch.empty_like(dw) if has_bias else None


@custom_op("fusedls::dropout_add_norm_bwd", mutates_args=())
def _dropout_add_norm_bwd(
    dy: torch.Tensor,
    dh_next: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: torch.Tensor,
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
    """(dx, dresidual, dweight, dbias); dresidual / dbias empty when not wanted; fp32 dweight, dbias."""
    dx, dres, dw, db = _norm_grads(h, weight, x_dtype, residual_dtype, has_bias)
    _impl(backend).dropout_add_norm_backward(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, dx, dres, dw, db)
    return dx, dres if dres is not None else h.new_empty(0), dw, db if db is not None else h.new_empty(0)


@_dropout_add_norm_bwd.register_fake
def _(dy, dh_next, h, weight, mean, rstd, seed, p, is_rms, x_dtype, residual_dtype, has_bias, backend):
    dx, dres, dw, db = _norm_grads(h, weight, x_dtype, residual_dtype, has_bias)
    return dx, dres if dres is not None else h.new_empty(0), dw, db if db is not None else h.new_empty(0)


# --------------------------------------------------------------------------- autograd Functions


class DropoutFunction(torch.autograd.Function):
    """``residual + dropout(x + bias)`` of contiguous x; forward(x, bias, residual, seed, p, backend).

    Saves only the seed. Backward: d out / d x = m (the regenerated mask, via the same kernel
    applied to the upstream gradient), d out / d residual = 1, d out / d bias = sum over rows of dx.
    """

    @staticmethod
    def forward(ctx, x, bias, residual, seed, p, backend, inplace=False):
        out_dtype = _promote(x, bias, residual)
        ctx.save_for_backward(seed)
        ctx.p, ctx.backend, ctx.x_dtype = p, backend, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        if inplace:  # plain dropout of a contiguous x, written over x (backward needs only the seed)
            _dropout_(x, seed, p, backend)
            ctx.mark_dirty(x)
            return x
        return _dropout_fwd(x, bias, residual, seed, p, out_dtype, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 7
        (seed,) = ctx.saved_tensors
        dx = _dropout_fwd(grad.contiguous(), None, None, seed, ctx.p, ctx.x_dtype, ctx.backend)
        dbias = dres = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, dx.shape[-1]).sum(0, dtype=acc_dtype(dx.dtype)).to(ctx.bias_dtype)
        if ctx.residual_dtype is not None and ctx.needs_input_grad[2]:
            dres = grad.to(ctx.residual_dtype)
        return dx, dbias, dres, None, None, None, None


class DropoutAddNormFunction(torch.autograd.Function):
    """(y, h) of (R, N) rows: ``h = residual + dropout(x)``, ``y = norm(h) * weight + bias``.

    forward(x, residual, weight, bias, seed, p, eps, is_rms, backend); seed None means no dropout.
    Saves h, the fp32 row statistics and the seed; backward regenerates the mask (the
    derivation is in fusedls/kernels/dropout.py).
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, seed, p, eps, is_rms, backend):
        h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        y, h, mean, rstd = _dropout_add_norm_fwd(x, residual, weight, bias, seed, p, eps, is_rms, h_dtype, backend)
        ctx.save_for_backward(h, weight, mean, rstd, seed)
        ctx.args = (p, is_rms, x.dtype, residual.dtype if residual is not None else None, bias is not None, backend)
        ctx.bias_dtype = bias.dtype if bias is not None else None
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
            dw.to(weight.dtype),
            db.to(ctx.bias_dtype) if has_bias else None,
            *(None,) * 5,
        )


# ---------------------------------------------------------------------------- public functions


def _check_p(p, training) -> float:
    p = check_unit_interval("p", p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return p


def _check_vector(name: str, value, n: int, x: torch.Tensor) -> None:
    if value is None:
        return
    check_tensor(name, value)
    check_floating(name, value)
    if value.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), the last dimension of x, got {tuple(value.shape)}")
    check_same_device("x", x, **{name: value})


def _check_x_residual(x, residual) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if residual is not None:
        check_tensor("residual", residual)
        check_floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same_device("x", x, residual=residual)


def _promote(*tensors: torch.Tensor | None) -> torch.dtype:
    """torch's result dtype of adding the tensors given (None skipped)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


def _resolve(x: torch.Tensor, *others: torch.Tensor | None) -> str:
    return _backend.resolve(x.device, _promote(x, *others), "dropout")


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.dropout` that stores no mask.

    Each element is zeroed with probability ``p`` and the others scaled by ``1/(1-p)`` (in fp32,
    rounded once; torch's ``x * mask * scale``, so a dropped NaN stays NaN). ``training=False``
    or ``p == 0`` returns ``input`` itself; ``p == 1`` returns ``input * 0`` as torch does;
    ``inplace=True`` writes the result into ``input`` and returns it. The mask comes from a seed
    drawn from ``generator`` (default: the device's) and is regenerated in backward.
    """
    check_tensor("input", input)
    check_floating("input", input)
    p = _check_p(p, training)
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input.mul_(0) if inplace else input * 0
    seed = _draw_seed(input, generator)
    x = input.contiguous()
    if inplace and x is input:  # written over input by the kernel: no second buffer
        return DropoutFunction.apply(input, None, None, seed, p, _resolve(x), True)
    out = DropoutFunction.apply(x, None, None, seed, p, _resolve(x))
    return input.copy_(out) if inplace else out  # a non-contiguous input is copied back


def dropout_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    *,
    bias: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(x + bias, p, training)`` in one pass (bias of shape (x.shape[-1],)).

    Dtype: torch's promotion of x, bias and residual. Gradients for x, residual and bias.
    """
    _check_x_residual(x, residual)
    check_tensor("residual", residual)
    _check_vector("bias", bias, x.shape[-1], x)
    p = _check_p(p, training)
    if not training or p == 0.0:  # summed in fp32 and rounded once, as the kernel does
        acc = acc_dtype(_promote(x, bias, residual))
        out = residual.to(acc) + x.to(acc) + (bias.to(acc) if bias is not None else 0.0)
        return out.to(_promote(x, bias, residual))
    seed = _draw_seed(x, generator)
    return DropoutFunction.apply(
        x.contiguous(), bias.contiguous() if bias is not None else None, residual.contiguous(), seed, p,
        _resolve(x, bias, residual),
    )  # fmt: skip


def _dropout_add_norm(x, residual, weight, bias, p, eps, training, generator, is_rms):
    _check_x_residual(x, residual)
    n = x.shape[-1]
    check_tensor("weight", weight)
    _check_vector("weight", weight, n, x)
    _check_vector("bias", bias, n, x)
    p = _check_p(p, training)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    backend = _resolve(x, residual, weight, bias)
    if backend == "triton":
        from ..kernels.tuning import DROPOUT_NORM_MAX_N

        widest = max(t.element_size() for t in (x, residual) if t is not None)
        longest = DROPOUT_NORM_MAX_N.get(widest, 0)
        if n > longest:  # the kernel keeps a whole row in registers
            if _backend.requested_backend() == "triton":
                raise ValueError(
                    f"backend 'triton' was requested but cannot run: rows of {n} elements exceed the "
                    f"norm kernel's {longest} for {widest}-byte data (the 'auto' backend runs them eagerly)"
                )
            backend = "eager"
    seed = _draw_seed(x, generator) if training and p > 0.0 else None
    rows = x.reshape(-1, n).contiguous()
    res = residual.reshape(-1, n).contiguous() if residual is not None else None
    y, h = DropoutAddNormFunction.apply(
        rows, res, weight.contiguous(), bias.contiguous() if bias is not None else None, seed, p, float(eps),
        is_rms, backend,
    )  # fmt: skip
    return y.reshape(x.shape), h.reshape(x.shape)


def dropout_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    p: float,
    eps: float = 1e-6,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + dropout(x)``, ``y = F.rms_norm(h, (N,), weight, eps)``; returns ``(y, h)``.

    ``residual=None`` gives ``h = dropout(x)``. ``h`` and ``y`` have torch's promotion of x and
    residual; statistics in fp32. Gradients for x, residual and weight.
    """
    return _dropout_add_norm(x, residual, weight, None, p, eps, training, generator, True)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    p: float,
    eps: float = 1e-5,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + dropout(x)``, ``y = F.layer_norm(h, (N,), weight, bias, eps)``; returns ``(y, h)``.

    As :func:`dropout_add_rms_norm`, with mean subtraction and an optional bias.
    """
    return _dropout_add_norm(x, residual, weight, bias, p, eps, training, generator, False)


# ------------------------------------------------------------------------------------ modules


class Dropout(torch.nn.Dropout):
    """:class:`torch.nn.Dropout` computed by :func:`fusedls.dropout` (no mask stored)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class _DropoutAddNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, p: float, eps: float, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.p = check_unit_interval("p", p)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, p={self.p}, eps={self.eps}"


class DropoutAddRMSNorm(_DropoutAddNorm):
    """``forward(x, residual=None) -> (y, h)``: :func:`dropout_add_rms_norm` with a learned weight."""

    def __init__(self, hidden_size: int, p: float = 0.1, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__(hidden_size, p, eps, False, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dropout_add_rms_norm(x, residual, self.weight, self.p, self.eps, self.training)


class DropoutAddLayerNorm(_DropoutAddNorm):
    """``forward(x, residual=None) -> (y, h)``: :func:`dropout_add_layer_norm` with weight and bias."""

    def __init__(
        self, hidden_size: int, p: float = 0.1, eps: float = 1e-5, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(hidden_size, p, eps, bias, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, self.eps, self.training)
