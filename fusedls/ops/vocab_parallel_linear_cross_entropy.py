"""``vocab_parallel_linear_cross_entropy``: the vocabulary-parallel loss of ``hidden @
local_weight.T + bias`` without the logits (``vocab_parallel_cross_entropy.py`` has the
communication and the local math it shares)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._tensors import acc_dtype
from ._checks import check_floating, check_same_device, check_tensor
from ._loss import reduce_rows
from .linear_cross_entropy_sums import _WeightGrad
from .vocab_parallel_cross_entropy import _forward, _local_grads, _output, _prepare, _rows_of


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
        return reduce_rows(loss, spec.reduction, denom)

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
