"""Vocabulary-parallel cross-entropy: every rank holds a contiguous slice of the classes.

Public: :func:`vocab_parallel_cross_entropy`, :func:`vocab_parallel_linear_cross_entropy` and
:func:`vocab_partition`. Results and gradients equal the single-device ``F.cross_entropy`` on
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

The local math has two backends with one interface, chosen per call by ``fusedls``'s backend
selection: Triton kernels (``fusedls/kernels/vocab_parallel_cross_entropy.py``: one read of the
local logits for the statistics, one read + one write for the gradient; CUDA, class-id targets)
and plain torch (``fusedls/eager/vocab_parallel_cross_entropy.py``: probability targets, fp64,
CPU, and code traced by ``torch.compile``, whose compiler fuses it). Both are chunked over rows
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
import torch.nn.functional as F

from . import _backend
from ._dtypes import acc_dtype
from .eager import vocab_parallel_cross_entropy as _local
from .ops.linear_cross_entropy_sums import _WeightGrad
from .ops._checks import check_choice, check_floating, check_int, check_same_device, check_tensor, check_unit_interval
from .ops.cross_entropy import _check_target_values

__all__ = ["VocabPartition", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_partition"]

REDUCTIONS = ("none", "mean", "sum")
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclasses.dataclass(frozen=True)
class VocabPartition:
    """Where this rank's classes lie: ``[start, start + size)`` of ``total`` classes."""

    start: int
    size: int
    total: int


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
        return _local if self.backend == "eager" else _backend.implementation("vocab_parallel_cross_entropy", self.backend)


# --------------------------------------------------------------------------- process group


def _group(process_group):
    """The group to communicate in (the default one for None); clear errors when there is none."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch; fusedls.distributed needs it")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every rank "
            "before the vocabulary-parallel losses"
        )
    if process_group is None:
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("this rank is not a member of process_group")
    return process_group


def _collective_device(group, device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def vocab_partition(local_size: int, process_group=None, *, device: torch.device | str | None = None) -> VocabPartition:
    """This rank's slice of the classes, from every rank's number of local classes.

    One ``all_gather`` of one int64 per rank, read on the host (a synchronisation): call it
    once and pass ``vocab_start=p.start, vocab_size=p.total`` to the losses so they need no
    communication beyond the loss's own. Slices follow rank order within the group; sizes may
    differ (uneven splits, even 0). ``device``: where the collective runs (by default CUDA for
    NCCL, CPU otherwise). Every rank of the group must call it.
    """
    local_size = check_int("local_size", local_size)
    if local_size < 0:
        raise ValueError(f"local_size must be >= 0, got {local_size}")
    group = _group(process_group)
    device = _collective_device(group, device)
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    sizes = torch.cat(sizes).tolist()
    rank = dist.get_rank(group)
    return VocabPartition(start=sum(sizes[:rank]), size=local_size, total=sum(sizes))


def _placement(n_local, group, device, vocab_start, vocab_size) -> tuple[int, int]:
    """(start, total) from the arguments, or from one all_gather when either is missing."""
    if vocab_start is not None:
        check_int("vocab_start", vocab_start)
    if vocab_size is not None:
        check_int("vocab_size", vocab_size)
    if vocab_start is None or vocab_size is None:
        if torch.compiler.is_compiling():  # the all_gather's answer is data the graph cannot branch on
            raise ValueError(
                "under torch.compile, pass vocab_start and vocab_size (e.g. from fusedls.distributed.vocab_partition, "
                "called once outside the compiled code)"
            )
        part = vocab_partition(n_local, group, device=device)
        for name, given, found in (("vocab_start", vocab_start, part.start), ("vocab_size", vocab_size, part.total)):
            if given is not None and given != found:
                raise ValueError(f"{name}={given} but the local class counts of the ranks give {found}")
        vocab_start, vocab_size = part.start, part.total
    if vocab_start < 0 or vocab_start + n_local > vocab_size:
        raise ValueError(
            f"this rank's {n_local} classes from vocab_start={vocab_start} do not fit in vocab_size={vocab_size}"
        )
    if vocab_size == 0:
        raise ValueError("the vocabulary has 0 classes (on every rank): no class id can be valid")
    return vocab_start, vocab_size


# ------------------------------------------------------------------------------ arguments


def _check_float(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite float {'> 0' if positive else '>= 0'}, got {value}")
    return value


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
    elif target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"target must hold class ids (int64 or another integer dtype) or probabilities, got {target.dtype}")
    elif target.shape != input.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} ({input_name}'s shape without its last dimension), "
            f"got {tuple(target.shape)}"
        )
    check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    eps = check_unit_interval("label_smoothing", label_smoothing)
    z_loss = _check_float("z_loss", z_loss, positive=False)
    if softcap is not None:
        softcap = _check_float("softcap", softcap, positive=True)
    if weight is not None:
        check_tensor("weight", weight)
        check_floating("weight", weight)
    check_same_device(input_name, input, target=target, weight=weight)
    group = _group(process_group)
    start, total = _placement(n_local, group, input.device, vocab_start, vocab_size)
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
        _check_target_values(target, total, ignore_index, "eager")  # CPU tensors (or FUSEDLS_CHECK_TARGETS=1)
    if torch.compiler.is_compiling():  # the compiler fuses the eager math itself (and cannot import while tracing)
        backend = "eager"
    else:
        features = {"prob_target"} if prob else set()
        backend = _backend.resolve(input.device, input.dtype, "vocab_parallel_cross_entropy", features)
    spec = _Spec(group, start, total, ignore_index, reduction, 1.0 - eps, eps / total, z_loss, softcap, backend)
    return spec, weight, _rows_of(target) if prob else target.reshape(-1)


# ----------------------------------------------------------------------- forward statistics


def _global_lse(lse_local, stats, group):
    """The two forward collectives: with M = max_r lse_r, lse = M + log sum_r exp(lse_r - M)
    (ranks with no classes have lse_r = -inf and add 0); ``stats`` is summed in place."""
    top = lse_local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    stats[:, _local.SUM_EXP] = torch.exp(lse_local - top)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return top + torch.log(stats[:, _local.SUM_EXP])


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
        coef = stats[:, _local.TARGET_WEIGHT]
        loss = coef * lse - stats[:, _local.TARGET_LOGIT]
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
            w_y, w_total = stats[:, _local.TARGET_WEIGHT], stats[:, _local.WEIGHT_TOTAL]
        # l = keep * w_y (lse - z_y) + (eps / C)(W lse - sum_c w_c z_c)
        loss = spec.keep * w_y * (lse - stats[:, _local.TARGET_LOGIT])
        coef = spec.keep * w_y
        if spec.spread != 0.0:
            loss = loss + spec.spread * (w_total * lse - stats[:, _local.WEIGHTED_SUM])
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


def _reduce(loss: torch.Tensor, denom: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if denom is None else total / denom


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
        return _reduce(loss, denom, spec.reduction)

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


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """forward(hidden (R, H), weight (C_local, H), bias (C_local,) or None, target (R,) or
    (R, C_local), class_weight (C_local,) acc dtype or None, spec, reduce_grad_hidden) -> loss in
    the accumulation dtype. The logits exist a chunk of rows at a time, in forward and again
    (recomputed) in backward; grad_weight (each chunk's product in fp32, as linear_cross_entropy's
    token chunks) and grad_bias accumulate in fp32 across chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, spec, reduce_grad_hidden):
        n_rows, n_cols = hidden.shape[0], weight.shape[0]
        acc = acc_dtype(hidden)
        loss, denom, saved = _forward(
            lambda rows: F.linear(hidden[rows], weight, bias), n_rows, n_cols, target, class_weight, spec, acc
        )
        ctx.save_for_backward(hidden, weight, bias, class_weight, *saved)
        ctx.spec, ctx.reduce_grad_hidden = spec, reduce_grad_hidden
        ctx.set_materialize_grads(False)
        return _reduce(loss, denom, spec.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_h, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        if grad_out is None or not (need_h or need_w or need_b or need_t):
            return (None,) * 7
        hidden, weight, bias, class_weight, *saved = ctx.saved_tensors
        acc = acc_dtype(hidden)
        (n_rows, n_hidden), n_cols = hidden.shape, weight.shape[0]
        grad_h = hidden.new_zeros((n_rows, n_hidden), dtype=acc) if need_h else None
        # summed in fp32 like linear_cross_entropy's: each chunk's product in fp32 (no rounding
        # of a chunk's partial sum to bf16), rounded once at the end
        grad_w = _WeightGrad(weight) if need_w else None
        grad_b = weight.new_zeros((n_cols,), dtype=acc) if need_b else None
        grad_t = torch.zeros_like(saved[3], memory_format=torch.contiguous_format) if need_t else None
        chunks = _local_grads(
            lambda rows: F.linear(hidden[rows], weight, bias), n_rows, n_cols, class_weight, ctx.spec, saved, grad_out,
            acc, need_t,
        )  # fmt: skip
        # logits = h W^T + b:  dh = g W,  dW = g^T h,  db = sum_rows g  (g = dL/dlogits).
        for rows, g, gt in chunks:
            g_in = g.to(hidden.dtype)
            if need_h:
                grad_h[rows] = g_in @ weight
            if need_w:
                grad_w.add(g_in, hidden[rows])
            if need_b:
                grad_b += g.sum(0)
            if need_t:
                grad_t[rows] = gt
        g = g_in = gt = None  # the last chunk's buffers, freed before grad_w.result() rounds the sum
        # Each rank's classes add their part to dh: sum over ranks (every rank gets all of it).
        if need_h and ctx.reduce_grad_hidden:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.spec.group)
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.result() if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            grad_t, None, None, None,
        )  # fmt: skip


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


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    process_group=None,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_grad_hidden: bool = True,
) -> torch.Tensor:
    """:func:`vocab_parallel_cross_entropy` of ``hidden @ local_weight.T + bias`` without the
    logits: they exist a chunk of rows at a time (forward, and recomputed in backward).

    Args:
        hidden: ``(..., H)``, the same on every rank.
        local_weight: ``(C_local, H)``, this rank's rows (classes) of the output projection.
        target: ``(...)`` global class ids (``hidden``'s shape without ``H``), or this rank's
            slice ``(..., C_local)`` of probability targets.
        process_group: see :func:`vocab_parallel_cross_entropy`.
        bias: ``(C_local,)`` this rank's slice of the bias, or None.
        reduce_grad_hidden: all-reduce (sum) ``grad_hidden`` over the group in backward, so
            every rank gets the full gradient (each rank's classes contribute to it). Pass
            False when the caller's own tensor-parallel layer already reduces it.
        The other keywords are those of :func:`vocab_parallel_cross_entropy`; ``weight`` is the
        class weights, ``(C,)`` or ``(C_local,)``.

    Gradients: ``hidden`` (summed over ranks, see ``reduce_grad_hidden``), ``local_weight`` and
    ``bias`` (this rank's slice; accumulated in fp32 across chunks), a probability ``target``.
    Loss in ``hidden``'s dtype (promoted with a probability target's).
    """
    check_tensor("hidden", hidden)
    check_tensor("local_weight", local_weight)
    check_floating("hidden", hidden)
    if hidden.dim() == 0:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a scalar")
    if local_weight.dim() != 2 or local_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"local_weight must have shape (C_local, {hidden.shape[-1]}) (hidden's last dimension), "
            f"got {tuple(local_weight.shape)}"
        )
    n_local = local_weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (n_local,):
            raise ValueError(f"bias must have shape ({n_local},), one entry per local class, got {tuple(bias.shape)}")
    for name, tensor in (("local_weight", local_weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")
    check_same_device("hidden", hidden, local_weight=local_weight, bias=bias)
    spec, weight, target_rows = _prepare(
        "hidden", hidden, n_local, target, process_group, ignore_index, reduction, label_smoothing,
        weight, z_loss, softcap, vocab_start, vocab_size,
    )  # fmt: skip
    loss = VocabParallelLinearCrossEntropyFunction.apply(
        _rows_of(hidden), local_weight, bias, target_rows, weight, spec, bool(reduce_grad_hidden)
    )
    return _output(loss, hidden, target, reduction)
