"""``cross_entropy``: the public function, its autograd Function and its custom ops.

Layers (one name, ``cross_entropy``, at each):

* :func:`cross_entropy` checks the arguments (metadata only), turns any input shape into
  ``(R, C)`` rows with contiguous classes, and applies :class:`CrossEntropyFunction`;
* :class:`CrossEntropyFunction` picks the gradient strategy and does the reduction;
* the ``fusedls::cross_entropy_*`` custom ops (opaque to ``torch.compile``) run one backend's
  module, ``fusedls/backend/<backend>/cross_entropy.py`` (eager, triton, cpp or cuda), each a
  ``CrossEntropyBackend`` (``fusedls/backend/protocols.py``).

Gradient strategy. When the upstream gradient of each row is known up to one factor (reduction
``mean``/``sum``, or any reduction with ``inplace_backward``), forward writes the gradient while
each row is still in L2 and backward only rescales it in place, skipping rows whose factor is
exactly 1 on the device: one HBM read of the logits and one write of the gradient in all.
Otherwise (``reduction="none"``, probability targets that require grad) forward saves the logits
and per-row statistics, and backward reads the logits again.

Options beyond torch (``z_loss``, ``softcap``, ``return_z_loss``, ``return_lse``; see
:func:`cross_entropy`) are kernel flags; the ones in use are the ``features`` handed to
``registry.resolve``, which passes over a backend that lacks one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.nn import _reduction

from ..backend import registry
from .._tensors import acc_dtype
from ._custom_op import custom_op
from ._loss import (
    INDEX_DTYPES, REDUCTIONS, CrossEntropyResult, check_loss_options, check_target_values, finish_forward,
    mean_denominator, reduce_rows, result, token_accuracy,
)  # fmt: skip
from ._checks import check_choice, check_floating, check_int, check_same_device, check_tensor, check_unit_interval

SMOOTHING_CONVENTIONS = ("uniform", "others")


def _impl(backend: str):
    return registry.implementation("cross_entropy", backend)


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    keep: float,
    spread: float,
    z_loss: float,
    softcap: Optional[float],
    want_argmax: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, coef, grad, argmax) per row; grad is empty unless grad_scale is given, argmax
    (int64, -1 on ignored rows) unless want_argmax."""
    check_target_values(target, logits.shape[1], ignore_index)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_scale is not None else logits.new_empty(0)
    argmax = _argmax_out(logits, want_argmax)
    out = _impl(backend).cross_entropy_forward(
        logits, target, weight, grad if grad_scale is not None else None, grad_scale, ignore_index, keep, spread,
        z_loss, softcap, argmax if want_argmax else None,
    )  # fmt: skip
    return (*out, grad, argmax)


def _argmax_out(logits: torch.Tensor, want: bool) -> torch.Tensor:
    """The argmax output of the forward ops: one int64 per row, or empty."""
    return logits.new_empty(logits.shape[0] if want else 0, dtype=torch.int64)


@_cross_entropy_fwd.register_fake
def _(logits, target, weight, grad_scale, ignore_index, keep, spread, z_loss, softcap, want_argmax, backend):
    row = logits.new_empty(logits.shape[0], dtype=acc_dtype(logits))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_scale is not None else logits.new_empty(0)
    return row, torch.empty_like(row), torch.empty_like(row), grad, _argmax_out(logits, want_argmax)


@custom_op("fusedls::cross_entropy_fwd_inplace", mutates_args=("logits",))
def _cross_entropy_fwd_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    grad_scale: torch.Tensor,
    ignore_index: int,
    keep: float,
    spread: float,
    z_loss: float,
    softcap: Optional[float],
    want_argmax: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, coef, argmax) per row; overwrites logits with grad_scale * dl/dlogits (the
    argmax is found before, in the same sweep as the statistics)."""
    check_target_values(target, logits.shape[1], ignore_index)
    argmax = _argmax_out(logits, want_argmax)
    out = _impl(backend).cross_entropy_forward(
        logits, target, weight, logits, grad_scale, ignore_index, keep, spread, z_loss, softcap,
        argmax if want_argmax else None,
    )  # fmt: skip
    return (*out, argmax)


@_cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, grad_scale, ignore_index, keep, spread, z_loss, softcap, want_argmax, backend):
    row = logits.new_empty(logits.shape[0], dtype=acc_dtype(logits))
    return row, torch.empty_like(row), torch.empty_like(row), _argmax_out(logits, want_argmax)


@custom_op("fusedls::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    keep: float,
    spread: float,
    softcap: Optional[float],
    target_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dlogits, dL/dtarget); the second is empty unless target_grad."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad_target = torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad else None
    _impl(backend).cross_entropy_backward(
        grad_loss, logits, target, weight, lse, coef, grad, grad_target, ignore_index, keep, spread,
        softcap,
    )  # fmt: skip
    return grad, grad_target if target_grad else logits.new_empty(0)


@_cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, weight, lse, coef, ignore_index, keep, spread, softcap, target_grad, backend):
    grad_target = torch.empty_like(target, memory_format=torch.contiguous_format) if target_grad else logits.new_empty(0)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), grad_target


@custom_op("fusedls::cross_entropy_scale_grad_", mutates_args=("grad",))
def _cross_entropy_scale_grad_(grad: torch.Tensor, factor: torch.Tensor, backend: str) -> None:
    """grad *= factor row by row (factor 0-dim or (R,), fp32)."""
    _impl(backend).cross_entropy_scale_grad_(grad, factor)


@_cross_entropy_scale_grad_.register_fake
def _(grad, factor, backend):
    return None


# --------------------------------------------------------------------------- autograd Function


class Call(NamedTuple):
    """The constant arguments of one call, handed to :class:`CrossEntropyFunction` as one object."""

    reduction: str
    ignore_index: int
    keep: float  # 1 - eps
    spread: float  # eps / C (the smoothing convention already applied)
    z_loss: float
    softcap: Optional[float]
    inplace: bool
    backend: str
    grad_enabled: bool  # the caller's grad mode (forward runs under no_grad)
    extras: bool  # return (loss, z, lse, argmax) rather than the loss alone
    want_z: bool  # compute the reduced z-loss term (extras only)
    want_argmax: bool  # find each row's argmax (extras only)


class CrossEntropyFunction(torch.autograd.Function):
    """Loss of ``(R, C)`` logits with reduction; see the module docstring for the strategy.

    ``forward(logits, target, weight, call)``: ``weight`` fp32 (fp64 for fp64 logits) or None,
    ``call`` a :class:`Call`. Returns the fp32 loss (0-dim, or ``(R,)`` for ``reduction="none"``;
    the z-loss included), or with ``call.extras`` ``(loss, z, lse, argmax)``: the z-loss alone
    reduced the same way (empty unless ``call.want_z``), the per-row lse and the per-row argmax
    (empty unless ``call.want_argmax``), without gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, call):
        prob = target.is_floating_point()
        # needs_input_grad says True under torch.no_grad() too: the caller's grad mode decides.
        need_grad = call.grad_enabled and ctx.needs_input_grad[0]
        need_target_grad = call.grad_enabled and prob and ctx.needs_input_grad[1]
        if call.reduction != "mean":
            denom = None
        elif prob:
            denom = float(logits.shape[0])
        else:
            denom = mean_denominator(target, weight, call.ignore_index, logits.shape[1], acc_dtype(logits))
        fused = need_grad and not need_target_grad and (call.reduction != "none" or call.inplace)
        opts = (call.ignore_index, call.keep, call.spread, call.z_loss, call.softcap, call.want_argmax, call.backend)
        if fused:
            # One launch: every small op here costs host time comparable to the kernel itself
            # on a GPU (benchmarks/profile_host.py).
            if isinstance(denom, torch.Tensor):
                grad_scale = torch.reciprocal(denom)
            else:  # None (sum, none) or the row count of probability targets (0: no rows to scale)
                scale = 1.0 if not denom else 1.0 / denom
                grad_scale = torch.full((), scale, device=logits.device, dtype=acc_dtype(logits))
            if call.inplace:
                loss, lse, coef, argmax = _cross_entropy_fwd_inplace(logits, target, weight, grad_scale, *opts)
                grad = logits
            else:
                loss, lse, coef, grad, argmax = _cross_entropy_fwd(logits, target, weight, grad_scale, *opts)
            ctx.save_for_backward(grad)
        else:
            loss, lse, coef, _, argmax = _cross_entropy_fwd(logits, target, weight, None, *opts)
            if need_grad or need_target_grad:
                ctx.save_for_backward(logits, target, weight, lse, coef)
        ctx.fused, ctx.denom, ctx.need_grad, ctx.need_target_grad, ctx.call = fused, denom, need_grad, need_target_grad, call
        if call.extras:
            return (*finish_forward(ctx, loss, lse, call.reduction, denom, call.z_loss, call.want_z), argmax)
        ctx.set_materialize_grads(False)
        return reduce_rows(loss, call.reduction, denom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_extras):
        if grad_out is None:
            return None, None, None, None
        call = ctx.call
        factor = grad_out if grad_out.dtype == acc_dtype(grad_out) else grad_out.to(acc_dtype(grad_out))
        if ctx.fused:
            # Reusing this gradient (backward twice with retain_graph=True) is refused by
            # autograd's saved-tensor version check, since the rescale below is in place.
            (grad,) = ctx.saved_tensors
            _cross_entropy_scale_grad_(grad, factor, call.backend)
            return grad, None, None, None
        logits, target, weight, lse, coef = ctx.saved_tensors
        if ctx.denom is not None:
            factor = factor / ctx.denom
        grad, grad_target = _cross_entropy_bwd(
            factor, logits, target, weight, lse, coef, call.ignore_index, call.keep, call.spread, call.softcap,
            ctx.need_target_grad, call.backend,
        )  # fmt: skip
        return grad if ctx.need_grad else None, grad_target if ctx.need_target_grad else None, None, None


# ---------------------------------------------------------------------------- public function


def _rows(tensor: torch.Tensor, class_dim: int) -> torch.Tensor:
    """(..., C, ...) -> (R, C) with the class dimension last and contiguous."""
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    elif tensor.dim() > 2:
        tensor = tensor.movedim(class_dim, -1)
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing, smoothing_convention):
    check_tensor("input", input)
    check_tensor("target", target)
    check_floating("input", input)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (C), (N, C) or (N, C, d1, ...), got a scalar")
    check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    eps = check_unit_interval("label_smoothing", label_smoothing)
    check_choice("smoothing_convention", smoothing_convention, SMOOTHING_CONVENTIONS)
    check_same_device("input", input, target=target, weight=weight)
    class_dim = 0 if input.dim() == 1 else 1
    n_cols = input.shape[class_dim]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"probability target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
    else:
        if target.dtype not in INDEX_DTYPES:
            raise TypeError(f"target must hold class ids (int64 or another integer dtype) or probabilities, got {target.dtype}")
        expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        if target.shape != expected:
            if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
                raise ValueError(f"input batch size {input.shape[0]} does not match target batch size {target.shape[0]}")
            raise ValueError(
                f"target of class ids must have shape {tuple(expected)} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if n_cols == 0:
            raise ValueError("input has 0 classes: no class id can be valid")
    if weight is not None:
        check_tensor("weight", weight)
        if not weight.is_floating_point():
            raise TypeError(f"weight must have a floating-point dtype, got {weight.dtype}")
        if weight.shape != (n_cols,):
            raise ValueError(f"weight must have shape ({n_cols},), one entry per class, got {tuple(weight.shape)}")
    return class_dim, n_cols, eps


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    smoothing_convention: str = "uniform",
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_lse: bool = False,
    return_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyResult:
    """Drop-in for :func:`torch.nn.functional.cross_entropy`, with fused kernels.

    Same arguments, shapes, values and gradients as torch: input ``(C)``, ``(N, C)`` or
    ``(N, C, d1, ..., dk)``; target of class ids (``ignore_index`` may be a real class) or of
    probabilities (input's shape, gradient w.r.t. it when it requires grad); ``weight``;
    ``reduction`` "none"/"mean"/"sum" with torch's weighted mean; ``label_smoothing`` in [0, 1].

    Extra keyword arguments:

    smoothing_convention: ``"uniform"`` (torch: ``eps / C`` on every class, target included)
        or ``"others"`` (``1 - eps`` on the target, ``eps / (C - 1)`` on every other class, as
        hand-written ``LabelSmoothingLoss`` classes do); computed as torch's convention with
        ``eps * C / (C - 1)``.
    inplace_backward: write the gradient into ``input``'s storage during forward, so forward +
        backward needs no logits-sized buffer. It destroys the logits: after the call
        ``input`` holds gradient values, and anything else that reads it (another loss, a
        metric, a saved activation) sees garbage; autograd raises if a saved tensor was
        overwritten. Only (C) / (N, C) inputs whose classes are contiguous are overwritten
        (others are copied first, and the flag then saves nothing).
    softcap: ``s > 0`` caps every logit first, ``x <- s * tanh(x / s)`` (Gemma 2); the loss, the
        z-loss and ``lse`` are those of the capped logits, the gradient that of the raw ones.
    z_loss: ``z >= 0`` adds ``z * lse^2`` (PaLM) to the loss of every row that is not ignored
        (probability targets: every row), NOT multiplied by the class weight ``w_y``; the
        reduction then applies to these augmented row losses: ``"none"`` per row, ``"sum"``
        summed, ``"mean"`` divided by the same denominator as the cross-entropy (torch's
        ``sum of w_y over the rows not ignored``, the count of those rows without weights).
        That is ``reduce(F.cross_entropy(x, t, w, reduction="none", ...) + z * lse^2 * valid)``.
    return_z_loss: also return that z-loss term alone, reduced like the loss, for logging; the
        returned loss already includes it, and this copy carries no gradient.
    return_lse: also return each row's log-sum-exp of the (capped) logits: accumulation dtype
        (fp32; fp64 for fp64 input), shaped like the per-row loss (``reduction="none"``), 0 on
        ignored rows, no gradient.
    return_accuracy: also return the token accuracy (class-id targets), from each row's argmax
        found in the same sweep as the loss: ``"mean"`` the fraction of the rows not ignored whose
        argmax (of the capped logits; the first of tied maxima, as ``torch.argmax``) is the
        target (NaN if every row is ignored), ``"sum"`` their number, ``"none"`` 1 or 0 per row
        (0 on ignored rows); unweighted, accumulation dtype, no gradient.

    Returns the loss tensor, or, when ``return_z_loss``, ``return_lse`` or ``return_accuracy``
    is set, a :class:`CrossEntropyResult` ``(loss, z_loss, lse, accuracy)`` NamedTuple whose
    fields not asked for are None (``out = cross_entropy(..., return_z_loss=True); out.z_loss``).

    Out-of-range class ids raise ValueError on CPU; on GPU they give a NaN loss and NaN
    gradient rows without synchronising (``FUSEDLS_CHECK_TARGETS=1`` raises instead).
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    class_dim, n_cols, eps = _check_cross_entropy_args(
        input, target, weight, ignore_index, reduction, label_smoothing, smoothing_convention
    )
    z_loss, softcap, features = check_loss_options(z_loss, softcap, return_z_loss, return_lse, return_accuracy)
    prob = target.is_floating_point()
    if prob and return_accuracy:
        raise ValueError("return_accuracy needs a target of class ids, got probabilities")
    if prob and n_cols == 0:  # nothing to compute; torch's own answer for the degenerate case
        loss = torch.nn.functional.cross_entropy(input, target, weight, reduction=reduction, label_smoothing=eps)
        zeros = input.new_zeros(target.shape[:class_dim] + target.shape[class_dim + 1 :], dtype=acc_dtype(input))
        return result(loss, torch.zeros_like(loss), zeros, return_z_loss, return_lse)
    if smoothing_convention == "others":
        eps = eps * n_cols / (n_cols - 1) if n_cols > 1 else 0.0
    backend = registry.resolve(input.device, input.dtype, "cross_entropy", features)
    logits = input if input.dim() == 2 and input.stride(1) == 1 else _rows(input, class_dim)
    if prob:
        target_rows = target if target.dim() == 2 and target.stride(1) == 1 else _rows(target, class_dim)
    else:
        target_rows = target if target.dim() == 1 else target.reshape(-1)
        if target_rows.dtype not in (torch.int64, torch.int32):
            target_rows = target_rows.to(torch.int64)
    weight_acc = weight.to(acc_dtype(input)).contiguous() if weight is not None else None
    extras = return_z_loss or return_lse or return_accuracy
    call = Call(reduction, ignore_index, 1.0 - eps, eps / n_cols, z_loss, softcap, bool(inplace_backward), backend,
                torch.is_grad_enabled(), extras, return_z_loss, return_accuracy)  # fmt: skip
    out = CrossEntropyFunction.apply(logits, target_rows, weight_acc, call)
    out_dtype = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    loss = out[0] if extras else out
    if reduction == "none" and loss.dim() != target.dim() - prob:
        loss = loss.reshape(target.shape[:class_dim] + target.shape[class_dim + 1 :] if prob else target.shape)
    if loss.dtype != out_dtype:
        loss = loss.to(out_dtype)
    if not extras:
        return loss
    row_shape = target.shape[:class_dim] + target.shape[class_dim + 1 :] if prob else target.shape
    z = out[1].reshape(row_shape) if return_z_loss and reduction == "none" else out[1]
    accuracy = None
    if return_accuracy:
        accuracy = token_accuracy(out[3], target_rows, ignore_index, reduction, acc_dtype(input))
        accuracy = accuracy.reshape(row_shape) if reduction == "none" else accuracy
    return result(loss, z.to(out_dtype), out[2].reshape(row_shape), return_z_loss, return_lse, accuracy)
