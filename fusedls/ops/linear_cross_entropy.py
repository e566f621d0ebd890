"""``linear_cross_entropy``: torch's ``F.linear_cross_entropy`` (the cross-entropy of ``input @
linear_weight.T + linear_bias``) without the logits.

Layers (one name, ``linear_cross_entropy``, at each):

* :func:`linear_cross_entropy` checks the arguments (metadata only) and lays them out as ``(N, d)``
  rows and one ``(V, d)`` head per position of the weight (``linear_cross_entropy_args.py``),
  applies :class:`LinearCrossEntropyFunction` to each head and combines them;
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
  weight dtype at the end, block by block (see _WeightGrad). With ``acc_dtype`` the weight's
  half-precision dtype the chunks' products are summed in the gradient's own storage instead
  (``addmm_``, one rounding per chunk, no fp32 buffer: _InPlaceWeightGrad),
* ``grad_bias += g.sum(0)`` in fp32 likewise.

Label smoothing, class weights, z-loss and soft-capping are applied by the cross-entropy kernel
on each logits chunk (it reads every logit anyway), so the rank-one identity
``sum_c w_c x_c = h . (sum_c w_c W_c) + sum_c w_c b_c`` is not needed and not used.

Gradient strategy. ``mean``/``sum``: the gradient of every row is known up to the upstream scalar,
so forward computes all three gradients and backward only multiplies them by ``grad_out`` in
place (skipped on the device where it is exactly 1: ``loss.backward()``); a factor other than 1
rounds them a second time. ``none``, and probability targets that require grad: forward keeps
only each row's lse and gradient coefficient (two fp32 numbers per token); backward recomputes
the chunks' logits and writes the gradients with the per-row upstream factors, so nothing
logits-sized outlives a chunk either way.

Which strategy: ``strategy="auto"`` (the default) takes the token chunks above when their
working memory (fp32 sum + one chunk) is at most one ``(N, V)`` logits tensor, else the vocabulary
blocks (:func:`pick_strategy`); ``"tokens"`` / ``"vocab"`` force one. ``"fused"`` (never formed
logits: a Triton GEMM with a cross-entropy epilogue) runs ``linear_cross_entropy_fused.py``.

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
from ._custom_op import custom_op
from . import linear_cross_entropy_fused as fused_path
from . import linear_cross_entropy_vocab as vocab
from .cross_entropy import _argmax_out, _cross_entropy_scale_grad_
from ._loss import (
    CrossEntropyResult, check_target_values, finish_forward, mean_denominator, reduce_rows, result, token_accuracy,
)  # fmt: skip
from .linear_cross_entropy_args import STRATEGIES, Parsed, legacy_keywords, parse
from .linear_cross_entropy_tokens import backward_chunks, forward_chunks, pass1, pick_strategy, tokens_per_chunk

__all__ = ["STRATEGIES", "LinearCrossEntropyFunction", "linear_cross_entropy"]


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
    want_argmax: bool,
    sum_in_place: bool,
    backend: str,
    strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, coef) per row, when ``grad_scale`` is given the gradients (hidden, weight, bias)
    times it, and each row's argmax when ``want_argmax``; outputs not asked for are empty.
    ``chunk_size`` 0: the default."""
    check_target_values(target, weight.shape[0], ignore_index)
    write_grad = grad_scale is not None
    need = tuple(need and write_grad for need in (need_hidden, need_weight, need_bias))
    # strategy="vocab": the token chunks give grad_hidden only, the vocabulary blocks the rest
    per_chunk = need if strategy == "tokens" else (need[0], False, False)
    chunk_rows, grad_w = pass1(hidden, weight, chunk_size, strategy, need[1], sum_in_place)
    argmax = _argmax_out(hidden, want_argmax)
    loss, lse, coef, grad_h, grad_w_chunks, grad_b = forward_chunks(
        hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, (z_loss, softcap),
        chunk_rows, per_chunk, backend, grad_w, argmax if want_argmax else None, sum_in_place,
    )  # fmt: skip
    if strategy == "vocab":
        _, grad_w, grad_b = vocab.block_grads(hidden, weight, bias, target, class_weight, lse, coef, grad_scale,
                                              ignore_index, keep, spread, softcap, (False, *need[1:]), backend,
                                              grad_w)  # fmt: skip
    else:
        grad_w = grad_w_chunks
    return loss, lse, coef, grad_h, grad_w, grad_b, argmax


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias else hidden.new_empty(0),
    )


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, z_loss, softcap,
      chunk_size, need_hidden, need_weight, need_bias, want_argmax, sum_in_place, backend, strategy):  # fmt: skip
    row = hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden))
    write = grad_scale is not None
    grads = _fake_grads(hidden, weight, bias, need_hidden and write, need_weight and write, need_bias and write)
    return (row, torch.empty_like(row), torch.empty_like(row), *grads, _argmax_out(hidden, want_argmax))


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
    need_target: bool,
    sum_in_place: bool,
    backend: str,
    strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (hidden, weight, bias, probability target) for per-row upstream factors
    ``grad_loss`` (fp32 (N,)), recomputing each chunk's (or vocabulary block's) logits;
    gradients not asked for are empty."""
    need = (need_hidden, need_weight, need_bias)
    chunk_rows, grad_w = pass1(hidden, weight, chunk_size, strategy, need_weight, sum_in_place)
    args = (hidden, weight, bias, target, class_weight, lse, coef)
    opts = (ignore_index, keep, spread, softcap)
    grad_t = torch.empty_like(target) if need_target else None
    if strategy != "vocab":  # the only strategy of probability targets
        grads = backward_chunks(grad_loss, *args, *opts, chunk_rows, need, backend, None, grad_t, sum_in_place)
        return (*grads, grad_t if need_target else hidden.new_empty(0))
    # grad_hidden: summed over the blocks when they run anyway (a weight or bias gradient) and its
    # fp32 sum is small (linear_cross_entropy_vocab.py), else from the token chunks recomputed (a
    # 5th matmul with the blocks, no such buffer)
    in_blocks = need_hidden and (need_weight or need_bias) and vocab.grad_hidden_in_blocks(hidden)
    grad_h = hidden.new_empty(0)
    if need_hidden and not in_blocks:
        grad_h = backward_chunks(grad_loss, *args, *opts, chunk_rows, (True, False, False), backend, grad_w)[0]
    block_h, grad_w, grad_b = vocab.block_grads(*args, grad_loss, *opts, (in_blocks, need_weight, need_bias),
                                                 backend, grad_w)  # fmt: skip
    return (block_h if in_blocks else grad_h), grad_w, grad_b, hidden.new_empty(0)


@_linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, lse, coef, ignore_index, keep, spread, softcap,
      chunk_size, need_hidden, need_weight, need_bias, need_target, sum_in_place, backend, strategy):  # fmt: skip
    grad_t = torch.empty_like(target) if need_target else hidden.new_empty(0)
    return (*_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias), grad_t)


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
    extras: bool  # return (loss, z, lse, argmax) rather than the loss alone
    want_z: bool
    want_argmax: bool
    sum_in_place: bool  # the weight gradient summed over the chunks in its own storage (acc_dtype)
    retain: bool  # backward scales copies of the forward's gradients (allow_retain_graph)
    filter_eps: float = 0.0  # strategy="fused": skip gradient tiles below it (0: exact)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss of ``(N, d)`` hidden rows through one ``(V, d)`` head; see the module docstring.

    ``forward(hidden, weight, bias, target, class_weight, denom, call)`` -> the loss, or ``(loss,
    z, lse, argmax)`` with ``call.extras``, as :class:`~fusedls.ops.cross_entropy.CrossEntropyFunction`.
    ``target``: ``(N,)`` class ids or ``(N, V)`` probabilities (gradient when it requires grad);
    ``denom``: the denominator of ``"mean"`` (a tensor or a number), None to compute this head's
    own (several heads share one).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, denom, call):
        needs, prob, n_rows = ctx.needs_input_grad, target.is_floating_point(), hidden.shape[0]
        need = (call.grad_enabled and needs[0], call.grad_enabled and needs[1],
                call.grad_enabled and needs[2] and bias is not None)  # fmt: skip
        need_target = call.grad_enabled and prob and needs[3]
        if call.reduction == "mean" and denom is None:
            denom = float(n_rows) if prob else mean_denominator(target, class_weight, call.ignore_index,
                                                                 weight.shape[0], acc_dtype(hidden))  # fmt: skip
        fused = any(need) and not need_target and call.reduction != "none"
        grad_scale = None
        if fused:
            if isinstance(denom, torch.Tensor):
                grad_scale = torch.reciprocal(denom)
            else:  # None (sum) or a row count (0: no rows to scale)
                grad_scale = torch.full((), 1.0 / denom if denom else 1.0, device=hidden.device, dtype=acc_dtype(hidden))
        args = (hidden, weight, bias, target, class_weight, grad_scale, call.ignore_index, call.keep, call.spread,
                call.z_loss, call.softcap)  # fmt: skip
        if call.strategy == "fused":  # class ids, no argmax (linear_cross_entropy_args refuses the rest)
            loss, lse, coef, *grads = fused_path.linear_cross_entropy_fused_fwd(*args, call.filter_eps, *need, call.backend)
            argmax = _argmax_out(hidden, False)
        else:
            loss, lse, coef, *grads, argmax = _linear_cross_entropy_fwd(
                *args, call.chunk_size, *need, call.want_argmax, call.sum_in_place, call.backend, call.strategy
            )  # fmt: skip
        if fused:
            ctx.save_for_backward(*grads)
        elif any(need) or need_target:
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, coef)
        ctx.fused, ctx.need, ctx.need_target, ctx.denom, ctx.call = fused, need, need_target, denom, call
        if call.extras:
            return (*finish_forward(ctx, loss, lse, call.reduction, denom, call.z_loss, call.want_z), argmax)
        ctx.set_materialize_grads(False)
        return reduce_rows(loss, call.reduction, denom)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_extras):
        if grad_out is None or not (any(ctx.need) or ctx.need_target):
            return None, None, None, None, None, None, None
        call = ctx.call
        factor = grad_out if grad_out.dtype == acc_dtype(grad_out) else grad_out.to(acc_dtype(grad_out))
        if ctx.fused:
            # Forward computed the gradients for an upstream 1; scale them in place (no work
            # on the device where the factor is 1). Backward twice is refused by autograd, unless
            # allow_retain_graph asked for copies to be scaled.
            grads = [g.clone() if call.retain and need else g for g, need in zip(ctx.saved_tensors, ctx.need)]
            for grad, need in zip(grads, ctx.need):
                if need:
                    _cross_entropy_scale_grad_(grad.view(-1, grad.shape[-1]), factor, call.backend)
            grads.append(None)
        else:
            hidden, weight, bias, target, class_weight, lse, coef = ctx.saved_tensors
            if call.reduction == "mean":
                factor = factor / ctx.denom
            args = (factor.expand(hidden.shape[0]).contiguous(), hidden, weight, bias, target, class_weight, lse, coef,
                    call.ignore_index, call.keep, call.spread, call.softcap)  # fmt: skip
            if call.strategy == "fused":
                grads = [*fused_path.linear_cross_entropy_fused_bwd(*args, call.filter_eps, *ctx.need, call.backend),
                         None]  # fmt: skip
            else:
                grads = _linear_cross_entropy_bwd(*args, call.chunk_size, *ctx.need, ctx.need_target, call.sum_in_place,
                                                  call.backend, call.strategy)  # fmt: skip
        grads = [g if need else None for g, need in zip(grads, (*ctx.need, ctx.need_target))]
        return (*grads[:3], grads[3], None, None, None)


# ---------------------------------------------------------------------------- public function


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *positional,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_lse: bool = False,
    return_accuracy: bool = False,
    chunk_size: int | None = None,
    strategy: str = "auto",
    acc_dtype: torch.dtype | None = None,
    loss_dtype: torch.dtype | None = None,
    filter_eps: float | None = None,
    **legacy,
) -> torch.Tensor | CrossEntropyResult:
    """Drop-in for torch's :func:`torch.nn.functional.linear_cross_entropy`, without the logits.

    ``F.cross_entropy(F.linear(input, linear_weight, linear_bias).reshape(*batch, C, d_1, ...,
    d_K), target, weight, ...)`` with torch's signature, shapes, values and gradients (``input``,
    ``linear_weight``, ``linear_bias`` and a probability ``target``): ``input`` ``(d,)``, ``(N,
    d)`` (or ``(..., d)`` beyond torch, for a ``(C, d)`` weight), ``linear_weight`` ``(C, d)`` (an
    LM head) or ``(C, d_1, ..., d_K, d)`` with ``linear_bias`` ``(C, d_1, ..., d_K)``; ``target``
    of class ids ``(*batch, d_1, ..., d_K)``, or of probabilities of the logits' shape; ``weight``
    the class weights; ``reduction``, ``label_smoothing`` as torch; ``ignore_index`` None means
    -100 for class ids (and must be None for probabilities); ``options`` torch's
    ``LinearCrossEntropyOptions`` (what each field does here:
    :func:`~fusedls.ops.linear_cross_entropy_args.read_options`). The loss has ``input``'s dtype
    (torch's promotion for probabilities). Bad arguments raise ValueError / TypeError that are
    also torch's RuntimeError; a 4th positional argument is refused (``linear_bias=`` is a
    keyword, as in torch), the earlier names ``bias=`` and ``class_weight=`` still work with a
    DeprecationWarning.

    fusedls's keyword-only extras: ``z_loss``, ``softcap``, ``return_z_loss``, ``return_lse``,
    ``return_accuracy`` as in :func:`fusedls.cross_entropy` (a
    :class:`~fusedls.CrossEntropyResult` when one is asked for; ``lse`` fp32, 0 on ignored rows;
    the accuracy from each token's argmax, found in the same pass as the loss through every
    chunk); ``loss_dtype`` the dtype of the returned loss and z-loss (e.g. ``torch.float32`` for
    a bf16 head: the fp32 value with no bf16 rounding); ``acc_dtype`` how the weight gradient is
    summed over token chunks (None: exact fp32; the weight's dtype: in place in the gradient, no
    fp32 ``(V, d)`` buffer, one rounding per chunk); ``chunk_size`` tokens per chunk;
    ``strategy``; ``filter_eps`` (``strategy="fused"``, which it selects under ``"auto"``).

    Memory: the logits never exist whole. ``strategy="tokens"``: one chunk of ``chunk_size``
    tokens at a time (default: about ``CHUNK_BYTES`` of logits), so the peak is that chunk plus an
    fp32 ``(V, d)`` buffer for ``grad_weight`` (for a bf16/fp16 head, unless ``acc_dtype`` sums in
    place). ``strategy="vocab"`` holds no fp32 buffer of the weight gradient: its token chunks,
    then most of its blocks of classes, live in that gradient's storage not yet written, at the
    price of one more logits matmul (``linear_cross_entropy_vocab.py``); class-id targets only.
    ``strategy="auto"`` (default) takes the token chunks when their working memory is no more
    than one ``(N, V)`` logits tensor, else the vocabulary blocks (:func:`pick_strategy`).
    ``strategy="fused"`` never forms logits at all: a Triton GEMM computes the loss in its
    epilogue and the gradients come by blocks of classes as for ``"vocab"``
    (``linear_cross_entropy_fused.py``; class ids and a ``(C, d)`` weight, no ``return_accuracy``).
    ``filter_eps``: its gradient tiles whose per-token softmax part is below it everywhere are
    skipped, the smoothing term kept exact; not with ``softcap``. Works under autograd and
    ``torch.compile`` (custom ops, no graph break).
    """
    if positional:
        raise TypeError(f"linear_cross_entropy() takes 3 positional arguments (input, linear_weight, target) as "
                        f"torch's, got {3 + len(positional)}: pass the head's bias as linear_bias=")  # fmt: skip
    if legacy:
        linear_bias, weight = legacy_keywords(legacy, linear_bias, weight)
    call = parse(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
                 chunk_size, acc_dtype, loss_dtype, strategy, (z_loss, softcap, return_z_loss, return_lse,
                 return_accuracy))  # fmt: skip
    filter_eps = fused_path.check_filter_eps(filter_eps, softcap, strategy)
    if filter_eps:
        strategy = "fused"
    n_rows, n_cols = call.rows.shape[0], linear_weight.shape[0]
    tokens_chunk = tokens_per_chunk(n_rows, n_cols, input.element_size(), input.device, call.chunk_size)
    head = call.heads[0]
    if not call.prob:
        strategy = pick_strategy(strategy, n_rows, head.weight, tokens_chunk, call.sum_in_place)
    if strategy == "fused":
        fused_path.check_call(call, return_accuracy)
    op = "linear_cross_entropy" if strategy == "fused" else "cross_entropy"
    backend = registry.resolve(input.device, input.dtype, op, call.features | ({"filter"} if filter_eps else set()))
    extras = return_z_loss or return_lse or return_accuracy
    fn_call = Call(reduction, call.ignore_index, 1.0 - call.eps, call.eps / n_cols, call.z_loss, call.softcap,
                   call.chunk_size or 0, backend, "tokens" if call.prob else strategy, torch.is_grad_enabled(), extras,
                   return_z_loss, return_accuracy, call.sum_in_place, call.retain, filter_eps)  # fmt: skip
    if len(call.heads) == 1:
        outs = [LinearCrossEntropyFunction.apply(call.rows, head.weight, head.bias, head.target, call.class_weight,
                                                 None, fn_call)]  # fmt: skip
    else:
        denom = _shared_denominator(call, reduction, n_cols)
        outs = [LinearCrossEntropyFunction.apply(call.rows, h.weight, h.bias, h.target, call.class_weight, denom,
                                                 fn_call) for h in call.heads]  # fmt: skip
    return _combine(outs, call, reduction, return_z_loss, return_lse, return_accuracy)


def _shared_denominator(call: Parsed, reduction: str, n_cols: int):
    """torch's ``"mean"`` denominator over every head's rows (several heads: a K-dimensional weight)."""
    if reduction != "mean":
        return None
    if call.prob:
        return float(call.rows.shape[0] * len(call.heads))
    target = torch.stack([h.target for h in call.heads])
    return mean_denominator(target, call.class_weight, call.ignore_index, n_cols, acc_dtype(call.rows))


def _combine(outs: list, call: Parsed, reduction: str, return_z_loss: bool, return_lse: bool, return_accuracy: bool):
    """The loss (or :class:`CrossEntropyResult`) of the heads' outputs: per-row values of every
    head side by side in torch's ``(*batch, d_1, ..., d_K)`` layout, reduced values summed (the
    heads share the ``"mean"`` denominator)."""
    extras = return_z_loss or return_lse or return_accuracy

    def joined(values: list, rows: bool) -> torch.Tensor:
        if rows:
            return (values[0] if len(values) == 1 else torch.stack(values, -1)).reshape(call.row_shape)
        return values[0] if len(values) == 1 else torch.stack(values).sum(0)

    loss = joined([o[0] if extras else o for o in outs], reduction == "none").to(call.out_dtype)
    if not extras:
        return loss
    z = joined([o[1] for o in outs], reduction == "none").to(call.out_dtype) if return_z_loss else None
    lse = joined([o[2] for o in outs], True) if return_lse else None
    accuracy = None
    if return_accuracy:
        argmax = torch.stack([o[3] for o in outs], -1)
        target = torch.stack([h.target for h in call.heads], -1)
        accuracy = token_accuracy(argmax, target, call.ignore_index, reduction, acc_dtype(call.rows))
        accuracy = accuracy.reshape(call.row_shape) if reduction == "none" else accuracy
    return result(loss, z, lse, return_z_loss, return_lse, accuracy)
