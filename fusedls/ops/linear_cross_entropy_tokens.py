"""``linear_cross_entropy``'s token chunks (``strategy="tokens"``, and pass 1 of ``"vocab"``).

The logits exist one chunk of tokens at a time, in one reused buffer (:func:`logits_chunks`):
per chunk ``logits = h_c @ W.T (+ b)`` (torch matmul: cuBLAS on GPU), then the cross-entropy
backend's forward computes each row's loss and lse and, when gradients are wanted, overwrites
the chunk in place with ``g = grad_scale * dloss/dlogits`` (the ``inplace_backward`` path of
``cross_entropy``); the chunk's contributions to the gradients are summed by
``linear_cross_entropy_sums.py``. Chunk sizes and the strategy ``"auto"`` picks are decided here.
"""

from __future__ import annotations

import torch

from ..backend import registry
from .._tensors import acc_dtype
from . import linear_cross_entropy_fused as fused
from . import linear_cross_entropy_vocab as vocab
from .linear_cross_entropy_sums import _Grads

# Bytes of one chunk of logits, per device type: large enough that the matmuls stay efficient
# (a few thousand tokens at LLM vocabularies), small next to the whole logits.
# On CUDA every chunk after the first also costs one read-add-write of the fp32 grad-weight sum
# (8 bytes per head element), so fewer, larger chunks: 1 GiB is 4 chunks for the Llama-3 8B head
# at 16k tokens (and a half-precision head's gradient bytes, when larger, set the size: 4 chunks
# for a 256k head, whose gradient is 2000 MiB, instead of 8).
# "meta": tensors without data stand for a GPU's (memory planning, fusedls/bench/live_bytes.py).
CHUNK_BYTES = {"cuda": 1 << 30, "meta": 1 << 30, "cpu": 32 << 20}


def tokens_per_chunk(
    n_rows: int, n_cols: int, element_size: int, device: torch.device, chunk_size: int | None, strategy: str = "tokens",
    room: int = 0,
) -> int:
    """Tokens per chunk: ``chunk_size`` (None or 0: the default), or as many as fit a budget of
    CHUNK_BYTES, evened out over chunks, with ``room`` (bytes, 0: none):

    * ``"tokens"``: at least ``room``, the bytes of a half-precision head's gradient, which
      rounding the fp32 sum holds beside it at the end anyway (fewer chunks, no more memory);
    * ``"vocab"``: at most ``room``, the weight gradient's storage, which pass 1 may use (nothing
      is written there before pass 2); without it, at most pass 2's ``(N, VOCAB_BLOCK_COLS)`` block.
    """
    if chunk_size:
        return max(1, min(chunk_size, n_rows))
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    if strategy == "vocab":
        block = max(1, n_rows) * vocab.block_cols(n_rows, n_cols, element_size, device) * element_size
        budget = min(budget, room or block)
    else:
        budget = max(budget, room)
    most = max(1, budget // max(1, n_cols * element_size))
    n_chunks = -(-n_rows // most) if n_rows else 1
    return max(1, -(-n_rows // n_chunks))


def pick_strategy(strategy: str, n_rows: int, weight: torch.Tensor, chunk_rows: int, sum_in_place: bool = False) -> str:
    """``"auto"``: the token chunks (3 matmuls) when their working memory, the fp32 ``(V, d)``
    grad-weight sum of a half-precision head plus one chunk of logits, is no more than one
    ``(N, V)`` logits tensor (torch's composition holds about three); else the vocabulary blocks
    (their buffers mostly in the weight gradient's storage, a 4th matmul). Llama-3 8B head (d =
    4096, V = 128256, bf16): tokens from about 12.4k tokens per call up, vocab below (at 4096
    tokens the token chunks would take 3038 MiB against torch's 3006). A sum in place
    (``sum_in_place``, ``acc_dtype`` the weight's dtype) has no fp32 sum: the token chunks."""
    if strategy != "auto":
        return strategy
    n_cols, d = weight.shape
    acc_bytes = acc_dtype(weight).itemsize
    weight_sum = n_cols * d * acc_bytes if acc_bytes != weight.element_size() and not sum_in_place else 0
    logits_row = n_cols * weight.element_size()
    tokens_bytes = weight_sum + min(chunk_rows, n_rows) * logits_row
    choice = "tokens" if tokens_bytes <= n_rows * logits_row else "vocab"
    return fused.pick(choice, weight, n_rows, tokens_bytes)  # "fused" only once measured


def logits_chunks(hidden, weight, bias, chunk_rows, storage=None):
    """Yields ``(rows, logits)`` chunk by chunk; ``logits`` lives in one reused buffer, placed at
    the start of ``storage`` (a contiguous tensor of hidden's dtype whose values are not needed)
    when it is large enough."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    size = min(chunk_rows, n_rows) * n_cols
    if storage is not None and storage.dtype == hidden.dtype and storage.is_contiguous() and storage.numel() >= size:
        buffer = storage.view(-1)[:size].view(-1, n_cols)
    else:
        buffer = hidden.new_empty(min(chunk_rows, n_rows), n_cols)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        logits = buffer[: rows.stop - start]
        if bias is None:
            torch.mm(hidden[rows], weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden[rows], weight.t(), out=logits)
        yield rows, logits


def forward_chunks(hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, opts,
                    chunk_rows, need, backend, storage=None, argmax=None, sum_in_place=False):  # fmt: skip
    """Forward over token chunks: (loss, lse, coef) per row and, for ``grad_scale`` given, the
    gradients in ``need`` = (hidden, weight, bias) of ``grad_scale * loss`` (empty if not needed);
    each row's argmax into ``argmax`` when given. The chunk buffer is in ``storage`` when given
    and large enough (see logits_chunks), else its own, which dies with this frame."""
    impl, acc, n_rows = registry.implementation("cross_entropy", backend), acc_dtype(hidden), hidden.shape[0]
    write = grad_scale is not None and any(need)
    if chunk_rows >= n_rows > 0:  # one chunk: its products are the gradients (one matmul each, one rounding)
        ((_, logits),) = logits_chunks(hidden, weight, bias, chunk_rows, storage)
        out = impl.cross_entropy_forward(logits, target, class_weight, logits if write else None,
                                         grad_scale if write else None, ignore_index, keep, spread, *opts,
                                         argmax)  # fmt: skip
        return (*out, *_one_chunk_grads(logits, hidden, weight, bias, need if write else (False,) * 3))
    loss, lse, coef = (torch.empty(n_rows, dtype=acc, device=hidden.device) for _ in range(3))
    grads = _Grads(hidden, weight, bias, *need, sum_in_place)
    for rows, logits in logits_chunks(hidden, weight, bias, chunk_rows, storage):
        loss[rows], lse[rows], coef[rows] = impl.cross_entropy_forward(
            logits, target[rows], class_weight, logits if write else None, grad_scale if write else None,
            ignore_index, keep, spread, *opts, argmax[rows] if argmax is not None else None,
        )  # fmt: skip
        if write:
            grads.add(rows, logits, hidden[rows], weight)
        del logits  # the last view would keep the chunk buffer alive while result() rounds the sums
    return (loss, lse, coef, *grads.result(bias))


def backward_chunks(grad_loss, hidden, weight, bias, target, class_weight, lse, coef, ignore_index, keep, spread,
                     softcap, chunk_rows, need, backend, storage=None, grad_target=None, sum_in_place=False):  # fmt: skip
    """Gradients in ``need`` for per-row upstream factors ``grad_loss``, recomputing each token
    chunk's logits (empty for those not needed), and the probability target's into
    ``grad_target`` when given; ``storage`` as for forward_chunks."""
    if not any(need) and grad_target is None:
        return _one_chunk_grads(None, hidden, weight, bias, need)
    impl = registry.implementation("cross_entropy", backend)
    if chunk_rows >= hidden.shape[0] > 0:
        ((_, logits),) = logits_chunks(hidden, weight, bias, chunk_rows, storage)
        impl.cross_entropy_backward(grad_loss, logits, target, class_weight, lse, coef, logits, grad_target,
                                    ignore_index, keep, spread, softcap)  # fmt: skip
        return _one_chunk_grads(logits, hidden, weight, bias, need)
    grads = _Grads(hidden, weight, bias, *need, sum_in_place)
    for rows, logits in logits_chunks(hidden, weight, bias, chunk_rows, storage):
        impl.cross_entropy_backward(
            grad_loss[rows], logits, target[rows], class_weight, lse[rows], coef[rows], logits,
            grad_target[rows] if grad_target is not None else None, ignore_index, keep, spread, softcap,
        )  # fmt: skip
        grads.add(rows, logits, hidden[rows], weight)
        del logits  # as in forward_chunks
    return grads.result(bias)


def _one_chunk_grads(g, hidden, weight, bias, need):
    """(grad_hidden, grad_weight, grad_bias) of one chunk holding every row, whose dloss/dlogits
    is ``g``: ``g @ W``, ``g.T @ H`` (fp32 accumulation inside the matmul, rounded once, as the
    chunked fp32 sum is) and ``g.sum(0)`` in fp32; empty where not needed."""
    empty = hidden.new_empty(0)
    return (
        torch.mm(g, weight) if need[0] else empty,
        torch.mm(g.t(), hidden) if need[1] else empty,
        g.sum(0, dtype=acc_dtype(bias)).to(bias.dtype) if need[2] else empty,
    )


def pass1(hidden, weight, chunk_size, strategy, need_weight, sum_in_place=False):
    """``(chunk_rows, grad_w)`` of a call: tokens per chunk (see chunk_rows's ``room``), and for
    ``strategy="vocab"`` with a weight gradient that gradient's (uninitialised) tensor, allocated
    before pass 1 so that pass 1's chunk buffer can live in it (pass 2 writes it), else None. The
    token chunks of a weight gradient summed in place (``sum_in_place``) hold no more logits than a
    vocabulary block of ``"vocab"`` (VOCAB_BLOCK_BYTES: 1024 tokens of the Llama-3 8B head at 16k
    tokens), so that the token strategy's memory is near the vocabulary blocks' (its own fp32 sum
    gone), at one rounding of the sum per chunk."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    if sum_in_place and need_weight and strategy == "tokens":
        return tokens_per_chunk(n_rows, n_cols, hidden.element_size(), hidden.device, chunk_size, "vocab"), None
    grad_w = torch.empty_like(weight) if strategy == "vocab" and need_weight else None
    head_bytes = weight.numel() * weight.element_size()
    if grad_w is not None:
        room = head_bytes if grad_w.is_contiguous() else 0
    else:
        room = head_bytes if need_weight and acc_dtype(weight) != weight.dtype else 0
    return tokens_per_chunk(n_rows, n_cols, hidden.element_size(), hidden.device, chunk_size, strategy, room), grad_w
