"""``dropout`` and ``dropout_add``: the public functions, their autograd Function and custom ops
(``dropout_add_{rms,layer}_norm`` are in ``dropout_norm.py``, the modules in ``fusedls/nn.py``).

Layers, as for ``cross_entropy``:

* the public functions check the arguments (metadata only), draw the seed, flatten to rows and
  apply an autograd Function;
* :class:`DropoutFunction` / :class:`DropoutAddNormFunction` save only the 8-byte seed (plus,
  for the norms, the returned h and fp32 row statistics): no mask, zero bytes per element;
* the ``fusedls::dropout_*`` custom ops (opaque to ``torch.compile``) run one backend:
  ``fusedls/backend/triton/dropout.py`` (triton) or ``fusedls/backend/eager/dropout.py`` (eager).

Seeds. Each call with dropout active draws one int64 from torch's generator (the default one of
the input's device, or ``generator=``) as a device tensor, with no host synchronisation; the
kernels load it. So ``torch.manual_seed`` makes runs reproducible, consecutive calls draw
different masks, the generator advances by one draw per call (torch's own dropout advances it by
its element count), and under CUDA-graph capture the draw is a graph-safe RNG op whose value
changes on each replay. Backward regenerates the mask from the saved seed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


import torch

from ..backend import registry
from .._tensors import acc_dtype
from ._custom_op import custom_op
from ._checks import check_floating, check_same_device, check_tensor, check_unit_interval

__all__ = ["DropoutFunction", "dropout", "dropout_add"]


def _impl(backend: str):
    return registry.implementation("dropout", backend)


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
    out = torch.empty_like(x) if out_dtype == x.dtype else torch.empty_like(x, dtype=out_dtype)
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


# --------------------------------------------------------------------------- autograd Functions


class Call(NamedTuple):
    """The constant arguments of one call, handed to :class:`DropoutFunction` as one object."""

    p: float
    backend: str
    out_dtype: torch.dtype  # torch's promotion of x, bias and residual
    inplace: bool  # plain dropout of a contiguous x, written over x


class DropoutFunction(torch.autograd.Function):
    """``residual + dropout(x + bias)`` of contiguous x; ``forward(x, bias, residual, seed, call)``.

    Keeps only the 8-byte seed (as an attribute: a tensor nothing writes). Backward: d out / d x =
    m (the regenerated mask, via the same kernel applied to the upstream gradient), d out /
    d residual = 1, d out / d bias = sum over rows of dx.
    """

    @staticmethod
    def forward(ctx, x, bias, residual, seed, call):
        ctx.seed, ctx.call, ctx.x_dtype = seed, call, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        if call.inplace:  # backward needs only the seed
            _dropout_(x, seed, call.p, call.backend)
            ctx.mark_dirty(x)
            return x
        return _dropout_fwd(x, bias, residual, seed, call.p, call.out_dtype, call.backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None
        call = ctx.call
        dx = _dropout_fwd(grad if grad.is_contiguous() else grad.contiguous(), None, None, ctx.seed, call.p, ctx.x_dtype,
                          call.backend)  # fmt: skip
        dbias = dres = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, dx.shape[-1]).sum(0, dtype=acc_dtype(dx.dtype)).to(ctx.bias_dtype)
        if ctx.residual_dtype is not None and ctx.needs_input_grad[2]:
            dres = grad if grad.dtype == ctx.residual_dtype else grad.to(ctx.residual_dtype)
        return dx, dbias, dres, None, None


# ---------------------------------------------------------------------------- public functions


def _check_p(p, training) -> float:
    if type(p) is not float or not 0.0 <= p <= 1.0:  # the usual call passes a float in range: no more checks
        p = check_unit_interval("p", p)
    if type(training) is not bool:
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


def _check_x_residual(x, residual, scalar_ok: bool = False) -> None:
    check_tensor("x", x)
    check_floating("x", x)
    if x.dim() == 0 and not scalar_ok:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if residual is not None:
        check_tensor("residual", residual)
        check_floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        check_same_device("x", x, residual=residual)


def _promote(x: torch.Tensor, *others: torch.Tensor | None) -> torch.dtype:
    """torch's result dtype of adding the tensors given (None skipped)."""
    dtype = x.dtype
    for t in others:
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
    backend = registry.resolve(x.device, x.dtype, "dropout")
    if inplace and x is input:  # written over input by the kernel: no second buffer
        return DropoutFunction.apply(input, None, None, seed, Call(p, backend, x.dtype, True))
    out = DropoutFunction.apply(x, None, None, seed, Call(p, backend, x.dtype, False))
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
    _check_x_residual(x, residual, scalar_ok=bias is None)
    check_tensor("residual", residual)
    _check_vector("bias", bias, x.shape[-1] if x.dim() else 1, x)
    p = _check_p(p, training)
    if not training or p == 0.0:  # summed in fp32 and rounded once, as the kernel does
        acc = acc_dtype(_promote(x, bias, residual))
        out = residual.to(acc) + x.to(acc) + (bias.to(acc) if bias is not None else 0.0)
        return out.to(_promote(x, bias, residual))
    seed = _draw_seed(x, generator)
    out_dtype = _promote(x, bias, residual)
    call = Call(p, registry.resolve(x.device, out_dtype, "dropout"), out_dtype, False)
    return DropoutFunction.apply(
        x.contiguous(), bias.contiguous() if bias is not None else None, residual.contiguous(), seed, call
    )
