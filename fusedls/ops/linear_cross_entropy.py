"""``linear_cross_entropy``: cross-entropy of ``hidden @ weight.T + bias`` without the logits.

Layers (one name, ``linear_cross_entropy``, at each):

* :func:`linear_cross_entropy` checks the arguments (metadata only), flattens ``hidden`` to
  ``(N, d)`` rows and applies :class:`LinearCrossEntropyFunction`;
* :class:`LinearCrossEntropyFunction` picks the gradient strategy and does the reduction;
* the ``fusedls::linear_cross_entropy_*`` custom ops (opaque to ``torch.compile``) run the chunk
  loop below with the cross-entropy backend (``fusedls/backend/triton/cross_entropy.py`` or
  ``fusedls/backend/eager/cross_entropy.py``): no kernel of its own.

Chunk loop. The logits exist one chunk of tokens at a time, in one reused buffer of about
:data:`CHUNK_BYTES` bytes (or, with the weight gradient of a bf16/fp16 head, as many bytes as that
gradient, which rounding the fp32 sum holds beside it at the end anyway: :func:`chunk_rows`):
per chunk ``logits = h_c @ W.T (+ b)`` (torch matmul: cuBLAS on GPU),
then the cross-entropy forward computes each row's loss and lse and, when gradients are wanted,
overwrites the chunk IN PLACE with ``g = grad_scale * dloss/dlogits`` while each row is still in
L2 (the fused path of ``cross_entropy(..., inplace_backward=True)``); then

* ``grad_hidden[chunk] = g @ W`` (one matmul, fp32 accumulation inside it, rounded once to the
  hidden dtype),
* ``grad_weight += g.T @ h_c`` summed in fp32 (fp64 for fp64) across chunks: for a bf16/fp16
  head, in fp32 blocks of 16384 classes; on CUDA each block's product is one cuBLAS matmul with
  an fp32 output (fp32 accumulation within the chunk, never rounded to bf16) that adds into the
  block (``addmm(out_dtype=float32)``; see _WeightGrad for the fallback); elsewhere the block's
  slice of ``g`` and ``h_c`` are upcast to fp32 for that matmul. The sum is rounded once to the
  weight dtype at the end, block by block (see _WeightGrad),
* ``grad_bias += g.sum(0)`` in fp32 likewise.

Label smoothing, class weights, z-loss and soft-capping are applied by the cross-entropy kernel
on each logits chunk (it reads every logit anyway), so the rank-one identity
``sum_c w_c x_c = h . (sum_c w_c W_c) + sum_c w_c b_c`` is not needed and not used.

Gradient strategy. ``mean``/``sum``: the gradient of every row is known up to the upstream scalar,
so forward computes all three gradients and backward only multiplies them by ``grad_out`` in
place (skipped on the device where it is exactly 1: ``loss.backward()``); a factor other than 1
rounds them a second time. ``none``: forward keeps only each row's lse and gradient coefficient
(two fp32 numbers per token); backward recomputes the chunks' logits and writes the gradient with
the per-row upstream factors, so nothing logits-sized outlives a chunk either way.

Which strategy: ``strategy="auto"`` (the default) takes the token chunks above when their
working memory (fp32 sum + one chunk) is at most one ``(N, V)`` logits tensor, else the vocabulary
blocks (:func:`pick_strategy`); ``"tokens"`` / ``"vocab"`` force one.

Vocabulary blocks (``strategy="vocab"``, no fp32 buffer of the weight gradient, a 4th matmul):
the token chunks above give each row's loss, lse and coef (and, for ``mean``/``sum``,
grad_hidden), then a second pass over blocks of classes gives the rest; that pass, its buffers
and its cost are in ``linear_cross_entropy_vocab.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..backend import registry
from .._tensors import acc_dtype
from ._checks import check_choice, check_floating, check_int, check_same_device, check_tensor, check_unit_interval
from ._custom_op import custom_op
from . import linear_cross_entropy_fused as fused_path
from . import linear_cross_entropy_vocab as vocab
from .cross_entropy import _cross_entropy_scale_grad_
from ._loss import (
    REDUCTIONS, CrossEntropyResult, check_loss_options, check_target_values, finish_forward, mean_denominator,
    reduce_rows, result,
)  # fmt: skip
from .linear_cross_entropy_tokens import backward_chunks, forward_chunks, pass1, pick_strategy, tokens_per_chunk

STRATEGIES = ("auto", "tokens", "vocab", "fused")


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    keep: float,
    spread: float,
    z_loss: float,
    softcap: Optional[float],
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, coef) per row and, when ``grad_scale`` is given, the gradients (hidden,
    weight, bias) times it; gradients not asked for are empty. ``chunk_size`` 0: the default."""
    check_target_values(target, weight.shape[0], ignore_index)
    write_grad = grad_scale is not None
    need = tuple(need and write_grad for need in (need_hidden, need_weight, need_bias))
    # strategy="vocab": the token chunks give grad_hidden only, the vocabulary blocks the rest
    per_chunk = need if strategy == "tokens" else (need[0], False, False)
    chunk_rows, grad_w = pass1(hidden, weight, chunk_size, strategy, need[1])
    loss, lse, coef, grad_h, grad_w_chunks, grad_b = forward_chunks(
        hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, (z_loss, softcap),
        chunk_rows, per_chunk, backend, storage=grad_w,
    )  # fmt: skip
    if strategy == "vocab":
        _, grad_w, grad_b = vocab.block_grads(hidden, weight, bias, target, class_weight, lse, coef, grad_scale,
                                              ignore_index, keep, spread, softcap, (False, *need[1:]), backend,
                                              grad_w)  # fmt: skip
    else:
        grad_w = grad_w_chunks
    return loss, lse, coef, grad_h, grad_w, grad_b


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias else hidden.new_empty(0),
    )


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, z_loss, softcap,
      chunk_size, need_hidden, need_weight, need_bias, backend, strategy):  # fmt: skip
    row = hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden))
    write = grad_scale is not None
    grads = _fake_grads(hidden, weight, bias, need_hidden and write, need_weight and write, need_bias and write)
    return (row, torch.empty_like(row), torch.empty_like(row), *grads)


@custom_op("fusedls::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    keep: float,
    spread: float,
    softcap: Optional[float],
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (hidden, weight, bias) for per-row upstream factors ``grad_loss`` (fp32 (N,)),
    recomputing each chunk's (or vocabulary block's) logits; gradients not asked for are empty."""
    need = (need_hidden, need_weight, need_bias)
    chunk_rows, grad_w = pass1(hidden, weight, chunk_size, strategy, need_weight)
    args = (hidden, weight, bias, target, class_weight, lse, coef)
    opts = (ignore_index, keep, spread, softcap)
    if strategy != "vocab":
        return backward_chunks(grad_loss, *args, *opts, chunk_rows, need, backend)
    # grad_hidden: summed over the blocks when they run anyway (a weight or bias gradient) and its
    # fp32 sum is small (linear_cross_entropy_vocab.py), else from the token chunks recomputed (a
    # 5th matmul with the blocks, no such buffer)
    in_blocks = need_hidden and (need_weight or need_bias) and vocab.grad_hidden_in_blocks(hidden)
    grad_h = hidden.new_empty(0)
    if need_hidden and not in_blocks:
        grad_h = backward_chunks(grad_loss, *args, *opts, chunk_rows, (True, False, False), backend, grad_w)[0]
    block_h, grad_w, grad_b = vocab.block_grads(*args, grad_loss, *opts, (in_blocks, need_weight, need_bias),
                                                 backend, grad_w)  # fmt: skip
    return (block_h if in_blocks else grad_h), grad_w, grad_b


@_linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, lse, coef, ignore_index, keep, spread, softcap,
      chunk_size, need_hidden, need_weight, need_bias, backend, strategy):  # fmt: skip
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


# --------------------------------------------------------------------------- autograd Function


class Call(NamedTuple):
    """The constant arguments of one call, handed to :class:`LinearCrossEntropyFunction` as one object."""

    reduction: str
    ignore_index: int
    keep: float  # 1 - eps
    spread: float  # eps / V
    z_loss: float
    softcap: Optional[float]
    chunk_size: int  # 0: the default
    backend: str  # the cross-entropy backend of each chunk
    strategy: str  # "tokens", "vocab" or "fused" (auto already decided)
    grad_enabled: bool  # the caller's grad mode (forward runs under no_grad)
    extras: bool  # return (loss, z, lse) rather than the loss alone
    want_z: bool
    filter_eps: float = 0.0  # strategy="fused": skip gradient tiles below it (0: exact)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss of ``(N, d)`` hidden rows through the ``(V, d)`` head; see the module docstring.

    ``forward(hidden, weight, bias, target, class_weight, call)`` -> the loss, or ``(loss, z, lse)``
    with ``call.extras``, as :class:`~fusedls.ops.cross_entropy.CrossEntropyFunction`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, call):
        needs = ctx.needs_input_grad
        need = (call.grad_enabled and needs[0], call.grad_enabled and needs[1],
                call.grad_enabled and needs[2] and bias is not None)  # fmt: skip
        denom = None
        if call.reduction == "mean":
            denom = mean_denominator(target, class_weight, call.ignore_index, weight.shape[0], acc_dtype(hidden))
        fused = any(need) and call.reduction != "none"
        grad_scale = None
        if fused:
            grad_scale = torch.reciprocal(denom) if denom is not None else torch.ones(
                (), device=hidden.device, dtype=acc_dtype(hidden))  # fmt: skip
        args = (hidden, weight, bias, target, class_weight, grad_scale, call.ignore_index, call.keep, call.spread,
                call.z_loss, call.softcap)  # fmt: skip
        if call.strategy == "fused":
            loss, lse, coef, *grads = fused_path.linear_cross_entropy_fused_fwd(*args, call.filter_eps, *need, call.backend)
        else:
            loss, lse, coef, *grads = _linear_cross_entropy_fwd(*args, call.chunk_size, *need, call.backend,
                                                                call.strategy)  # fmt: skip
        if fused:
            ctx.save_for_backward(*grads)
        elif any(need):
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, coef)
        ctx.fused, ctx.need, ctx.call = fused, need, call
        if call.extras:
            return finish_forward(ctx, loss, lse, call.reduction, denom, call.z_loss, call.want_z)
        ctx.set_materialize_grads(False)
        return reduce_rows(loss, call.reduction, denom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_extras):
        if grad_out is None or not any(ctx.need):
            return None, None, None, None, None, None
        call = ctx.call
        factor = grad_out if grad_out.dtype == acc_dtype(grad_out) else grad_out.to(acc_dtype(grad_out))
        if ctx.fused:
            # Forward computed the gradients for an upstream 1; scale them in place (no work
            # on the device where the factor is 1). Backward twice is refused by autograd.
            grads = ctx.saved_tensors
            for grad, need in zip(grads, ctx.need):
                if need:
                    _cross_entropy_scale_grad_(grad.view(-1, grad.shape[-1]), factor, call.backend)
        else:
            hidden, weight, bias, target, class_weight, lse, coef = ctx.saved_tensors
            args = (factor.expand(hidden.shape[0]).contiguous(), hidden, weight, bias, target, class_weight, lse, coef,
                    call.ignore_index, call.keep, call.spread, call.softcap)  # fmt: skip
            if call.strategy == "fused":
                grads = fused_path.linear_cross_entropy_fused_bwd(*args, call.filter_eps, *ctx.need, call.backend)
            else:
                grads = _linear_cross_entropy_bwd(*args, call.chunk_size, *ctx.need, call.backend, call.strategy)
        return (*(g if need else None for g, need in zip(grads, ctx.need)), None, None, None)


# ---------------------------------------------------------------------------- public function


def _check_linear_args(hidden, weight, target, bias, class_weight, ignore_index, reduction, chunk_size):
    for name, tensor in (("hidden", hidden), ("weight", weight), ("target", target)):
        check_tensor(name, tensor)
    check_floating("hidden", hidden)
    check_int("ignore_index", ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    check_same_device("hidden", hidden, weight=weight, target=target, bias=bias, class_weight=class_weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., d), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, d) with d = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    n_cols = weight.shape[0]
    if n_cols == 0:
        raise ValueError("weight has 0 rows (classes): no class id can be valid")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class ids (an integer dtype), got {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (hidden's without d), got {tuple(target.shape)}")
    for name, vector, dtype in (("bias", bias, hidden.dtype), ("class_weight", class_weight, None)):
        if vector is None:
            continue
        check_tensor(name, vector)
        check_floating(name, vector)
        if vector.shape != (n_cols,):
            raise ValueError(f"{name} must have shape ({n_cols},), one entry per class, got {tuple(vector.shape)}")
        if dtype is not None and vector.dtype != dtype:
            raise TypeError(f"{name} must have hidden's dtype {dtype}, got {vector.dtype}")
    if chunk_size is not None and (check_int("chunk_size", chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_lse: bool = False,
    chunk_size: int | None = None,
    strategy: str = "auto",
    filter_eps: float | None = None,
) -> torch.Tensor | CrossEntropyResult:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without the logits.

    Same value and gradients (``hidden``, ``weight``, ``bias``) as that composition, for
    ``hidden`` of shape ``(..., d)``, ``weight`` ``(V, d)`` (an LM head), ``bias`` ``(V,)``,
    ``target`` ``(...)`` class ids; ``ignore_index``, ``reduction`` ("none" gives the target's
    shape), ``label_smoothing`` and ``class_weight`` (torch's ``weight``) as in
    :func:`fusedls.cross_entropy`, and its options ``z_loss``, ``softcap``, ``return_z_loss``,
    ``return_lse`` with the same meaning and the same return convention (a
    :class:`~fusedls.CrossEntropyResult` when an extra is asked for; ``lse`` in fp32, 0 on ignored
    rows). The loss has ``hidden``'s dtype, as torch's would.

    Memory: the logits never exist whole. ``strategy="tokens"``: one chunk of ``chunk_size``
    tokens at a time (default: about ``CHUNK_BYTES`` of logits; see the module docstring for the
    gradient accumulation), so the peak is that chunk plus an fp32 ``(V, d)`` buffer for
    ``grad_weight`` (for a bf16/fp16 head), instead of several ``(N, V)`` tensors.
    ``strategy="vocab"`` holds no fp32 buffer of the weight gradient: its token chunks, then
    most of its blocks of classes, live in that gradient's storage not yet written, and only
    the last classes take a small own buffer, at the price of one more logits matmul
    (``linear_cross_entropy_vocab.py``); same values and gradients. Llama-3 8B head, bf16,
    counted with ``python -m fusedls.bench.memory_model``: ``F.linear`` + torch's cross-entropy
    12024 MiB, ``"tokens"`` 3134 MiB, ``"vocab"`` 1163 MiB.
    ``strategy="auto"`` (default) takes the token chunks when their working memory is no more than
    one ``(N, V)`` logits tensor, else the vocabulary blocks (:func:`pick_strategy`): the Llama-3
    head gets the token chunks at 16k tokens per call and the blocks at 4k, where the chunks
    would need more memory than torch. ``strategy="fused"`` never forms logits at all: a Triton
    GEMM computes the loss in its epilogue, and the gradients come by blocks of classes as for
    ``"vocab"`` (``linear_cross_entropy_fused.py``). ``filter_eps`` (``"fused"``; with ``"auto"``
    it selects ``"fused"``): gradient tiles whose per-token softmax part is below it everywhere are
    skipped, the smoothing term kept exact; not with ``softcap``. Works under autograd and
    ``torch.compile`` (custom ops, no graph break).
    """
    _check_linear_args(hidden, weight, target, bias, class_weight, ignore_index, reduction, chunk_size)
    eps = check_unit_interval("label_smoothing", label_smoothing)
    check_choice("strategy", strategy, STRATEGIES)
    z_loss, softcap, features = check_loss_options(z_loss, softcap, return_z_loss, return_lse)
    filter_eps = fused_path.check_filter_eps(filter_eps, softcap, strategy)
    if filter_eps:
        strategy = "fused"
    n_cols, d = weight.shape
    rows = hidden if hidden.dim() == 2 and hidden.is_contiguous() else hidden.reshape(-1, d).contiguous()
    target_rows = target if target.dim() == 1 else target.reshape(-1)
    if target_rows.dtype not in (torch.int64, torch.int32):
        target_rows = target_rows.to(torch.int64)
    class_weight_acc = class_weight.to(acc_dtype(hidden)).contiguous() if class_weight is not None else None
    tokens_chunk = tokens_per_chunk(rows.shape[0], n_cols, hidden.element_size(), hidden.device, chunk_size)
    strategy = pick_strategy(strategy, rows.shape[0], weight, tokens_chunk)
    op = "linear_cross_entropy" if strategy == "fused" else "cross_entropy"
    backend = registry.resolve(hidden.device, hidden.dtype, op, features | ({"filter"} if filter_eps else set()))
    extras = return_z_loss or return_lse
    call = Call(reduction, ignore_index, 1.0 - eps, eps / n_cols, z_loss, softcap, chunk_size or 0, backend, strategy,
                torch.is_grad_enabled(), extras, return_z_loss, filter_eps)  # fmt: skip
    out = LinearCrossEntropyFunction.apply(rows, weight, bias, target_rows, class_weight_acc, call)
    loss = out[0] if extras else out
    if reduction == "none" and loss.shape != target.shape:
        loss = loss.reshape(target.shape)
    if loss.dtype != hidden.dtype:
        loss = loss.to(hidden.dtype)
    if not extras:
        return loss
    z = out[1].reshape(target.shape) if return_z_loss and reduction == "none" else out[1]
    return result(loss, z.to(hidden.dtype), out[2].reshape(target.shape), return_z_loss, return_lse)
