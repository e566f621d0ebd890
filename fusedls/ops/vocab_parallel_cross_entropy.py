"""``vocab_parallel_cross_entropy``: cross-entropy when every rank holds a contiguous slice of the
classes; the communication and local math also serve ``vocab_parallel_linear_cross_entropy``
(``vocab_parallel_linear_cross_entropy.py``). Public through :mod:`fusedls.distributed`. Results and gradients equal the single-device ``F.cross_entropy`` on
the concatenated logits (label smoothing over the GLOBAL number of classes, GLOBAL class
weights, every reduction, ``ignore_index``; probability targets as each rank's slice of the
distribution), plus z-loss and logit soft-capping.

Communication (per call, whatever the number of rows; ``process_group`` or the default group):

1. only when ``vocab_start``/``vocab_size`` are not given: one ``all_gather`` of the local
   class counts (one int64 per rank) and a host read of it, to place this rank's slice;
2. forward: ``all_reduce(MAX)`` of the ``(R,)`` local log-sum-exps, then one
   ``all_reduce(SUM)`` of an ``(R, 5)`` fp32 tensor (fp64 for fp64 logits) of per-row scalars:
   ``sum_c exp(z_c - max)``, the target logit (0 on ranks that do not own it), the target's
   class weight, ``sum_c w_c z_c`` (label smoothing) and the local weight total (probability
   targets: ``sum_c w_c t'_c`` and ``sum_c w_c t'_c z_c`` instead of the target's). Every rank then
   computes the same global log-sum-exp, row losses, mean denominator and so the same loss;
3. backward: nothing for :func:`vocab_parallel_cross_entropy` (the local softmax comes from the
   saved global log-sum-exp); one ``all_reduce(SUM)`` of ``grad_hidden`` for the linear variant.

The local math is a ``VocabParallelCrossEntropyBackend`` (``fusedls/backend/protocols.py``),
chosen per call by the registry: the Triton kernels (one read of the local logits for the
statistics, one read + one write for the gradient; CUDA, class-id targets) or plain torch
(probability targets, fp64, CPU, and code traced by ``torch.compile``, whose compiler fuses it). Both are chunked over rows
so temporaries stay bounded, with no host synchronisation. Works on any
``torch.distributed`` backend that has these collectives (NCCL for CUDA tensors, gloo for CPU).
Importing this module needs no initialised process group; torch imports ``torch.distributed``
anyway, so ``import fusedls`` imports it too at no cost.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from .._tensors import acc_dtype
from ..backend import registry
from ..backend.protocols import SUM_EXP, TARGET_LOGIT, TARGET_WEIGHT, WEIGHT_TOTAL, WEIGHTED_SUM
from ._checks import check_choice, check_floating, check_int, check_same_device, check_tensor, check_unit_interval
from ._loss import INDEX_DTYPES, REDUCTIONS, check_loss_options, check_target_values, reduce_rows
from .vocab_parallel_group import placement, process_group_of


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What every rank computes with: the group, the placement and the loss's constants."""

    group: object
    start: int  # first global class id of this rank
    total: int  # global number of classes C
    ignore_index: int
    reduction: str
    keep: float  # 1 - eps
    spread: float  # eps / C, C global
    z_loss: float
    softcap: float | None
    backend: str  # "eager" or "triton": which module does the local math

    @property
    def impl(self):
        return registry.implementation("vocab_parallel_cross_entropy", self.backend)


# ------------------------------------------------------------------------------ arguments


def _prepare(
    input_name, input, n_local, target, process_group, ignore_index, reduction, label_smoothing, weight, z_loss,
    softcap, vocab_start, vocab_size,
):  # fmt: skip
    """Checks the arguments shared by both losses (metadata only, then the placement, which may
    communicate); returns the spec, the local class weights (acc dtype) and the flat targets."""
    check_tensor("target", target)
    prob = target.is_floating_point()
    if prob:
        if target.shape != input.shape[:-1] + (n_local,):
            raise ValueError(
                f"probability target must have shape {tuple(input.shape[:-1]) + (n_local,)} (this rank's slice of "
                f"each row's distribution), got {tuple(target.shape)}"
            )
    elif target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold class ids (int64 or another integer dtype) or probabilities, got {target.dtype}")
    elif target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} ({input_name}'s shape without its last dimension), "
            f"got {tuple(target.shape)}"
        )
    check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    eps = check_unit_interval("label_smoothing", label_smoothing)
    z_loss, softcap, _ = check_loss_options(z_loss, softcap, False, False)
    if weight is not None:
        check_tensor("weight", weight)
        check_floating("weight", weight)
    check_same_device(input_name, input, target=target, weight=weight)
    group = process_group_of(process_group)
    start, total = placement(n_local, group, input.device, vocab_start, vocab_size)
    if weight is not None:
        if weight.shape == (total,):
            weight = weight[start : start + n_local]
        elif weight.shape != (n_local,):
            raise ValueError(
                f"weight must have shape ({total},) (every class) or ({n_local},) (this rank's classes), "
                f"got {tuple(weight.shape)}"
            )
        weight = weight.to(acc_dtype(input)).contiguous()
    if not torch.compiler.is_compiling():  # a data-dependent branch; compiled code gets NaN rows instead
        check_target_values(target, total, ignore_index, always=target.device.type == "cpu")
    if torch.compiler.is_compiling():  # the compiler fuses the eager math itself (and cannot import while tracing)
        backend = "eager"
    else:
        features = {"prob_target"} if prob else set()
        backend = registry.resolve(input.device, input.dtype, "vocab_parallel_cross_entropy", features)
    spec = _Spec(group, start, total, ignore_index, reduction, 1.0 - eps, eps / total, z_loss, softcap, backend)
    return spec, weight, _rows_of(target) if prob else target.reshape(-1)


# ----------------------------------------------------------------------- forward statistics


def _global_lse(lse_local, stats, group):
    """The two forward collectives: with M = max_r lse_r, lse = M + log sum_r exp(lse_r - M)
    (ranks with no classes have lse_r = -inf and add 0); ``stats`` is summed in place."""
    top = lse_local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    stats[:, SUM_EXP] = torch.exp(lse_local - top)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return top + torch.log(stats[:, SUM_EXP])


def _forward(logits_of, n_rows, n_cols, target, weight, spec: _Spec, acc):
    """Row losses and what backward needs, with the two forward collectives.

    ``target``: ``(R,)`` global class ids or ``(R, C_local)`` local probabilities. Returns
    ``(loss, denom, saved)``: the ``(R,)`` row losses, the mean denominator (0-dim, None unless
    ``reduction="mean"``) and ``(lse, coef, target_coef, local target, row_scale)``.
    """
    if target.is_floating_point():
        lse_local, stats = spec.impl.local_statistics(
            logits_of, n_rows, n_cols, None, None, target, weight, spec.keep, spec.spread, spec.softcap, acc
        )
        lse = _global_lse(lse_local, stats, spec.group)
        # l = sum_c w_c t'_c (lse - z_c) = A lse - B; torch's mean divides by the row count.
        coef = stats[:, TARGET_WEIGHT]
        loss = coef * lse - stats[:, TARGET_LOGIT]
        local_target, target_coef = target, None
        denom = lse.new_full((), float(n_rows)) if spec.reduction == "mean" else None
        ignored = bad = None
    else:
        y = target.long()
        ignored = y == spec.ignore_index
        bad = ((y < 0) | (y >= spec.total)) & ~ignored
        y_local = y - spec.start
        owned = (y_local >= 0) & (y_local < n_cols) & ~ignored
        local_target = y_local.masked_fill(~owned, 0)
        lse_local, stats = spec.impl.local_statistics(
            logits_of, n_rows, n_cols, local_target, owned, None, weight, spec.keep, spec.spread, spec.softcap, acc
        )
        lse = _global_lse(lse_local, stats, spec.group)
        if weight is None:
            w_y, w_total = (~ignored).to(acc), float(spec.total)
        else:
            w_y, w_total = stats[:, TARGET_WEIGHT], stats[:, WEIGHT_TOTAL]
        # l = keep * w_y (lse - z_y) + (eps / C)(W lse - sum_c w_c z_c)
        loss = spec.keep * w_y * (lse - stats[:, TARGET_LOGIT])
        coef = spec.keep * w_y
        if spec.spread != 0.0:
            loss = loss + spec.spread * (w_total * lse - stats[:, WEIGHTED_SUM])
            coef = coef + spec.spread * w_total
        target_coef = torch.where(owned, spec.keep * w_y, 0.0)
        # torch's mean: divided by the summed weights of the rows not ignored (w_y is 0 for them).
        denom = w_y.sum() if spec.reduction == "mean" else None
    if spec.z_loss != 0.0:  # + lam lse^2
        loss = loss + spec.z_loss * lse.square()
        coef = coef + (2.0 * spec.z_loss) * lse
    row_scale = torch.ones_like(lse) if denom is None else torch.ones_like(lse) / denom
    if ignored is not None:
        loss = loss.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
        row_scale = row_scale.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
    return loss, denom, (lse, coef, target_coef, local_target, row_scale)


def _local_grads(logits_of, n_rows, n_cols, weight, spec: _Spec, saved, grad_out, acc, target_grad, out=None):
    """Yields ``(rows, scale * dl/dlogits, scale * dl/dtarget or None)`` chunk by chunk (no
    communication); the gradient goes into ``out[rows]`` when ``out`` is given, else is in ``acc``."""
    lse, coef, target_coef, local_target, row_scale = saved
    scale = row_scale * grad_out.to(acc)
    if n_cols == 0:
        return
    for rows in spec.impl.row_chunks(n_rows, n_cols):
        yield rows, *spec.impl.local_grad(
            logits_of(rows), lse[rows], coef[rows], local_target[rows],
            None if target_coef is None else target_coef[rows], weight, spec.keep, spec.spread, spec.softcap,
            scale[rows], acc, target_grad, None if out is None else out[rows],
        )  # fmt: skip


# ------------------------------------------------------------------------ autograd Functions


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """forward(logits (R, C_local), target (R,) class ids or (R, C_local) probabilities,
    weight (C_local,) acc dtype or None, spec) -> loss in the accumulation dtype: 0-dim, or
    (R,) for ``reduction="none"``."""

    @staticmethod
    def forward(ctx, logits, target, weight, spec):
        n_rows, n_cols = logits.shape
        acc = acc_dtype(logits)
        loss, denom, saved = _forward(lambda rows: logits[rows], n_rows, n_cols, target, weight, spec, acc)
        ctx.save_for_backward(logits, weight, *saved)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return reduce_rows(loss, spec.reduction, denom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_x, need_t = ctx.needs_input_grad[:2]
        if grad_out is None or not (need_x or need_t):
            return None, None, None, None
        logits, weight, *saved = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad_t = torch.zeros_like(saved[3], memory_format=torch.contiguous_format) if need_t else None
        chunks = _local_grads(
            lambda rows: logits[rows], n_rows, n_cols, weight, ctx.spec, saved, grad_out, acc_dtype(logits), need_t,
            grad,
        )  # fmt: skip
        for rows, _, gt in chunks:  # the gradient is written into grad
            if need_t:
                grad_t[rows] = gt
        return grad if need_x else None, grad_t, None, None


# ---------------------------------------------------------------------------- public functions


def _rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (R, K) with the last dimension contiguous (works for K = 0)."""
    rows = tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _output(loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss shaped like the rows (``"none"``) in torch's result dtype."""
    prob = target.is_floating_point()
    if reduction == "none":
        loss = loss.reshape(target.shape[:-1] if prob else target.shape)
    return loss.to(torch.promote_types(input.dtype, target.dtype) if prob else input.dtype)


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    process_group=None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of ``process_group``.

    Args:
        local_logits: ``(..., C_local)``, this rank's contiguous slice of the classes (classes
            in the LAST dimension). Slices follow rank order and may differ in size (even 0).
        target: ``(...)`` GLOBAL class ids in ``[0, C)``, the same on every rank; or
            probabilities ``(..., C_local)``: this rank's slice of each row's target
            distribution (torch's probability-target semantics: ``mean`` divides by the row
            count, ``ignore_index`` does not apply, gradients flow into it when it requires grad).
        process_group: the ranks sharing the vocabulary; None is the default group.
        ignore_index: class id whose rows contribute nothing (may be a real class).
        reduction: ``"mean"`` (torch's: divided by the summed weights of the rows not ignored),
            ``"sum"`` or ``"none"`` (the row losses, shaped like ``target``).
        label_smoothing: ``eps`` in [0, 1]: ``eps / C`` on every class, ``C`` the GLOBAL count.
        weight: class weights, either every class ``(C,)`` (the same tensor on every rank) or
            this rank's slice ``(C_local,)``; the mean's denominator uses the target's weight
            wherever it lives (it travels in the forward all-reduce).
        z_loss: ``lam``: adds ``lam * lse**2`` to every row not ignored (unweighted; divided by
            the same denominator under ``"mean"``).
        softcap: ``s``: the logits become ``s * tanh(x / s)`` before everything.
        vocab_start, vocab_size: this rank's first global class id and the global ``C``. Give
            both (e.g. from :func:`vocab_partition`, once) to skip the ``all_gather`` of the
            local class counts, which also reads them on the host.

    Returns the loss in ``local_logits``' dtype (promoted with a probability target's),
    identical on every rank; the gradients (``local_logits``, a probability ``target``) need no
    communication.
    Every rank must call it with the same ``target``, arguments and grad mode (collectives).
    Out-of-range class ids raise ValueError on CPU and give NaN rows on GPU (no sync), as
    :func:`fusedls.cross_entropy`.
    """
    check_tensor("local_logits", local_logits)
    check_floating("local_logits", local_logits)
    if local_logits.dim() == 0:
        raise ValueError("local_logits must have at least 1 dimension (..., C_local), got a scalar")
    n_local = local_logits.shape[-1]
    spec, weight, target_rows = _prepare(
        "local_logits", local_logits, n_local, target, process_group, ignore_index, reduction, label_smoothing,
        weight, z_loss, softcap, vocab_start, vocab_size,
    )  # fmt: skip
    loss = VocabParallelCrossEntropyFunction.apply(_rows_of(local_logits), target_rows, weight, spec)
    return _output(loss, local_logits, target, reduction)
