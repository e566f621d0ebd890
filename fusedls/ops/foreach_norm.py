"""Multi-tensor norms, gradient clipping and weight penalties: ``foreach_norm``, ``total_norm``,
``clip_grad_norm_``, ``l1_penalty``, ``l2_penalty`` and ``regularization_penalty``.

Layers, as for the other ops: the public functions check the arguments (metadata only: never a
tensor value, so no host synchronisation) and pick a backend; the ``fusedls::foreach_*`` custom
ops (opaque to ``torch.compile``) run it: ``fusedls/backend/triton/foreach_norm.py`` (triton: a fixed
number of launches whatever the number of tensors, one elementwise launch per dtype in the list)
or ``fusedls/backend/eager/foreach_norm.py`` (``torch._foreach_*``). The penalties are autograd Functions
whose backward writes every weight's gradient in one launch per dtype.

Layout: the kernels read a tensor as the flat run of ``numel`` elements at ``data_ptr()``, which
holds for every non-overlapping, dense tensor (contiguous, channels-last, ...). Other tensors
are made contiguous for the norms, and a non-dense gradient is clipped by its own ``mul_``.

ord (``norm_type``): any float; 2, 1, inf (max |x|), -inf (min |x|), 0 (count of non-zeros) and
other p (``(sum |x|^p)^(1/p)``), as ``torch.linalg.vector_norm``. inf, -inf and p < 0 have no
value on an empty tensor: a ValueError, as torch raises.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Callable, Iterable

import torch

from ..backend import registry
from .._tensors import is_dense
from ._checks import check_floating, check_tensor
from ._custom_op import custom_op

__all__ = [
    "PenaltyFunction", "clip_grad_norm_", "foreach_norm", "l1_penalty", "l2_penalty", "regularization_penalty",
    "total_norm",
]  # fmt: skip

_OP = "foreach_norm"


def _impl(backend: str):
    return registry.implementation(_OP, backend)


def _result_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::foreach_norm", mutates_args=())
def _foreach_norm_op(tensors: list[torch.Tensor], ord: float, backend: str) -> torch.Tensor:
    """(n,) norms in the accumulation dtype (fp32; fp64 when a tensor is fp64)."""
    return _impl(backend).foreach_norms(tensors, ord)


@_foreach_norm_op.register_fake
def _(tensors, ord, backend):
    return tensors[0].new_empty(len(tensors), dtype=_result_dtype(tensors))


@custom_op("fusedls::foreach_total_norm", mutates_args=())
def _total_norm_op(
    tensors: list[torch.Tensor], ord: float, norm_of_norms: bool, square: bool, backend: str
) -> torch.Tensor:
    """0-dim norm of all the tensors together (squared when ``square``)."""
    return _impl(backend).total_norm(tensors, ord, norm_of_norms, None, square)[0]


@_total_norm_op.register_fake
def _(tensors, ord, norm_of_norms, square, backend):
    return tensors[0].new_empty((), dtype=_result_dtype(tensors))


@custom_op("fusedls::foreach_clip_", mutates_args=("grads",))
def _clip_op(grads: list[torch.Tensor], ord: float, max_norm: float, backend: str) -> torch.Tensor:
    """Total norm of ``grads`` (norm of the per-tensor norms), and ``grads *= min(max_norm /
    (total + 1e-6), 1)`` in place."""
    impl = _impl(backend)
    total, coef = impl.total_norm(grads, ord, True, max_norm)
    impl.scale_(grads, coef)
    return total


@_clip_op.register_fake
def _(grads, ord, max_norm, backend):
    return grads[0].new_empty((), dtype=_result_dtype(grads))


@custom_op("fusedls::foreach_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[torch.Tensor], coef: torch.Tensor, backend: str) -> None:
    """``t *= coef`` for every tensor, in place."""
    _impl(backend).scale_(tensors, coef)


@_scale_op.register_fake
def _(tensors, coef, backend):
    return None


@custom_op("fusedls::foreach_penalty_bwd", mutates_args=())
def _penalty_bwd_op(tensors: list[torch.Tensor], grad: torch.Tensor, kind: str, backend: str) -> list[torch.Tensor]:
    """``grad * sign(w)`` (l1) or ``grad * 2w`` (l2) of every tensor."""
    return _impl(backend).penalty_backward(tensors, grad, kind)


@_penalty_bwd_op.register_fake
def _(tensors, grad, kind, backend):
    return [torch.empty_like(t) for t in tensors]


# --------------------------------------------------------------------------------- validation


def _check_ord(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a float (or 'inf' / '-inf'), got {type(value).__name__}")
    try:
        ord = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a float (or 'inf' / '-inf'), got {value!r}") from None
    if math.isnan(ord):
        raise ValueError(f"{name} must not be NaN")
    return ord


def _check_tensors(name: str, tensors: list, ord: float | None = None) -> list[torch.Tensor]:
    """Checked, dense tensors of one device (non-dense ones made contiguous; the same list when
    all are dense). A fast pass first: this runs on every training step over every gradient."""
    device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
    empty_ok = ord is None or not (ord < 0 or ord == math.inf)
    for t in tensors:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device == device
                and (empty_ok or t.numel()) and t.is_contiguous()):  # fmt: skip
            break
    else:
        return tensors
    out = []
    for i, t in enumerate(tensors):
        check_tensor(f"{name}[{i}]", t)
        check_floating(f"{name}[{i}]", t)
        if t.device != device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but {name}[0] is on {device}; all tensors must be on one device"
            )
        if not empty_ok and t.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty: the {ord} norm of an empty tensor is undefined (no identity)")
        out.append(t if is_dense(t) else t.contiguous())
    return out


def _as_list(name: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable) or isinstance(tensors, (str, bytes)):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _backend_for(tensors: list[torch.Tensor]) -> str:
    dtypes = {t.dtype for t in tensors}
    dtype = torch.float64 if torch.float64 in dtypes else tensors[0].dtype
    return registry.resolve(tensors[0].device, dtype, _OP)


def _out_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    # torch.stack of the per-tensor norms (each in its tensor's dtype) promotes them
    dtype = tensors[0].dtype
    for other in {t.dtype for t in tensors}:
        dtype = torch.promote_types(dtype, other)
    return dtype


# ---------------------------------------------------------------------------- process groups


def _all_reduce_norm(total: torch.Tensor, ord: float, process_group) -> torch.Tensor:
    """The norm over every rank from each rank's norm: MAX (inf), MIN (-inf), SUM (0), else the
    SUM of the p-th powers then the root, taken in fp64 (an fp32 norm of 1e30 squares to 1e60)."""
    import torch.distributed as dist

    if ord in (math.inf, -math.inf, 0.0):
        op = {math.inf: dist.ReduceOp.MAX, -math.inf: dist.ReduceOp.MIN, 0.0: dist.ReduceOp.SUM}[ord]
        total = total.clone()
        dist.all_reduce(total, op=op, group=process_group)
        return total
    powered = total.double().pow(ord)
    dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=process_group)
    return powered.pow(1.0 / ord).to(total.dtype)


def _empty_total(process_group) -> torch.Tensor:
    """torch's total norm of no tensors (0.0), on the device the process group reduces on."""
    if process_group is not None:
        import torch.distributed as dist

        if dist.get_backend(process_group) == "nccl":
            return torch.zeros((), device=torch.device("cuda", torch.cuda.current_device()))
    return torch.tensor(0.0)


# ---------------------------------------------------------------------------- public functions


@torch.no_grad()
def foreach_norm(tensors, ord: float = 2) -> list[torch.Tensor]:
    """The norm of each tensor, as ``torch._foreach_norm(tensors, ord)``: a list of 0-dim tensors,
    each in its tensor's dtype (accumulated in fp32). An empty list gives ``[]``. All the tensors
    in a fixed number of launches (triton: two, plus one per dtype in the list). Not
    differentiable."""
    ord = _check_ord("ord", ord)
    tensors = _check_tensors("tensors", _as_list("tensors", tensors), ord)
    if not tensors:
        return []
    norms = _foreach_norm_op(tensors, ord, _backend_for(tensors))
    if len({t.dtype for t in tensors}) == 1:
        return list(norms.to(tensors[0].dtype).unbind(0))
    return [n.to(t.dtype) for n, t in zip(norms.unbind(0), tensors)]


@torch.no_grad()
def total_norm(tensors, ord: float = 2, *, process_group=None) -> torch.Tensor:
    """The norm of all the tensors together, as if concatenated into one vector (0-dim, in the
    promoted dtype of the tensors; ``torch.tensor(0.)`` for an empty list, as
    ``torch.nn.utils.get_total_norm``). For ord 0 that is the count of all non-zero elements.
    ``process_group``: the tensors are this rank's shards; the result is the norm over every rank
    (an all-reduce). Not differentiable."""
    ord = _check_ord("ord", ord)
    tensors = _check_tensors("tensors", _as_list("tensors", tensors), ord)
    if not tensors:
        total = _empty_total(process_group)
    else:
        total = _total_norm_op(tensors, ord, False, False, _backend_for(tensors)).to(_out_dtype(tensors))
    return _all_reduce_norm(total, ord, process_group) if process_group is not None else total


@torch.no_grad()
def clip_grad_norm_(
    parameters,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group=None,
) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_`: scales the gradients of ``parameters`` (a tensor or
    an iterable of tensors; those without ``.grad`` are skipped) in place by
    ``min(max_norm / (total_norm + 1e-6), 1)`` and returns ``total_norm``, the norm of the
    per-gradient norms (in the gradients' promoted dtype; for norm_type 0, as torch, the number of
    gradients with a non-zero element).

    A fixed number of launches whatever the number of gradients (triton: norm partials and
    scaling once per gradient dtype, two merges) and no host synchronisation unless
    ``error_if_nonfinite`` (a RuntimeError when the norm is NaN or inf, as torch). ``foreach`` is
    accepted for compatibility and has no effect. ``process_group``: the gradients are this
    rank's shards (FSDP-style); the norm is taken over every rank (an all-reduce) and every rank
    scales its shards by the same coefficient.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        generator = isinstance(parameters, types.GeneratorType)
        parameters = _as_list("parameters", parameters)
        if generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    for i, p in enumerate(parameters):
        check_tensor(f"parameters[{i}]", p)
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a float, got {type(max_norm).__name__}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}")
    ord, max_norm = _check_ord("norm_type", norm_type), float(max_norm)
    raw = [p.grad for p in parameters if p.grad is not None]
    grads = _check_tensors("grads", raw, ord)  # non-dense ones are copies here
    if not grads:
        total = _empty_total(process_group)
        return _all_reduce_norm(total, ord, process_group) if process_group is not None else total
    dense = raw if grads is raw else [g for g in raw if is_dense(g)]
    backend = _backend_for(grads)
    if process_group is None and len(dense) == len(grads) and not error_if_nonfinite:
        return _clip_op(grads, ord, max_norm, backend).to(_out_dtype(grads))
    total = _total_norm_op(grads, ord, True, False, backend)
    if process_group is not None:
        total = _all_reduce_norm(total, ord, process_group)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):  # the one host sync
        raise RuntimeError(
            f"The total norm of order {ord} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if dense:
        _scale_op(dense, coef, backend)
    for g in raw:  # gradients that are not dense: scaled one by one
        if not is_dense(g):
            g.mul_(coef)
    return total.to(_out_dtype(grads))


# --------------------------------------------------------------------------------- penalties


class PenaltyFunction(torch.autograd.Function):
    """``sum |w|`` (kind "l1") or ``sum w^2`` ("l2") over tensors; forward(kind, backend, *tensors).

    Saves the tensors; backward writes every tensor's gradient (``g sign(w)`` or ``g 2w``, g the
    upstream gradient) in one launch per dtype.
    """

    @staticmethod
    def forward(ctx, kind, backend, *tensors):
        ctx.kind, ctx.backend = kind, backend
        ctx.save_for_backward(*tensors)
        return _total_norm_op(list(tensors), 1.0 if kind == "l1" else 2.0, False, kind == "l2", backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        grads = _penalty_bwd_op(list(tensors), grad.reshape(()), ctx.kind, ctx.backend)
        return (None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])))


def _penalty(kind: str, tensors) -> torch.Tensor:
    tensors = _as_list("tensors", tensors)
    if not tensors:
        raise ValueError(f"{kind}_penalty needs at least one tensor (an empty list has no device or dtype)")
    tensors = _check_tensors("tensors", tensors)
    return PenaltyFunction.apply(kind, _backend_for(tensors), *tensors)


def l1_penalty(tensors) -> torch.Tensor:
    """``sum |w|`` over every element of every tensor: a 0-dim fp32 tensor (fp64 when a tensor
    is fp64), differentiable w.r.t. each tensor (``sign(w)``; 0 at 0). An empty list is a
    ValueError."""
    return _penalty("l1", tensors)


def l2_penalty(tensors) -> torch.Tensor:
    """``sum w^2`` over every element of every tensor (no 1/2 factor): 0-dim fp32 (fp64 when a
    tensor is fp64), differentiable (``2w``). An empty list is a ValueError."""
    return _penalty("l2", tensors)


def default_include(name: str, param: torch.Tensor) -> bool:
    """The default rule of :func:`regularization_penalty`: weights with at least 2 dimensions
    (linear, convolution and embedding weights); biases and norm weights (1-D) are left out."""
    return param.ndim >= 2


def regularization_penalty(
    module: torch.nn.Module, l1: float = 0.0, l2: float = 0.0, *, include: Callable | None = None
) -> torch.Tensor:
    """``l1 * sum |w| + l2 * sum w^2`` over the parameters of ``module`` that require grad and
    that ``include(name, param)`` selects (default :func:`default_include`: ``param.ndim >= 2``,
    so biases and norm weights are skipped). Differentiable; a 0-dim fp32 tensor. A term whose
    coefficient is 0 is not computed; both 0 (or no parameter selected) gives a zero tensor."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for name, value in (("l1", l1), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (name, param) -> bool, got {type(include).__name__}")
    rule = include or default_include
    params = [p for name, p in module.named_parameters() if p.requires_grad and rule(name, p)]
    total = None
    for coef, fn in ((l1, l1_penalty), (l2, l2_penalty)):
        if coef and params:
            term = coef * fn(params)
            total = term if total is None else total + term
    if total is None:
        first = next(module.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return total
