"""``linear_cross_entropy(..., strategy="vocab")``: the pass over blocks of classes.

No fp32 buffer of the weight gradient. The token chunks of ``linear_cross_entropy.py`` need the
fp32 ``(V, d)`` grad-weight sum (4 bytes per head element: 2 GB for the Llama-3 8B head). With
``strategy="vocab"`` the token chunks (pass 1) compute only what is complete within a chunk,
each row's loss, lse, coef and ``grad_hidden[chunk] = g @ W`` (one matmul over all V, fp32
accumulation inside it); then a second pass sweeps blocks of classes (at most
:data:`VOCAB_BLOCK_COLS`, and at most :data:`VOCAB_BLOCK_BYTES` of logits):
``x = H @ W[blk].T (+ b[blk])`` for ALL tokens in one reused ``(N, Cb)`` buffer, turned in place
into ``g = scale * dl/dx`` by the vocabulary-parallel local gradient (``local_grad`` of
``fusedls/backend/{triton,eager}/vocab_parallel_cross_entropy.py``: the same math on a slice of the
classes given the global lse and coef), then ``grad_W[blk] = g.T @ H`` (one matmul over every
token, fp32 accumulation inside it, written once in the weight dtype) and ``grad_b[blk] =
g.sum(0)`` in fp32. ``mean``/``sum`` run both passes in forward (as the token strategy does).
``none``: forward runs pass 1 for lse and coef only; backward runs the blocks with the per-row
factors, each block also adding ``g @ W[blk]`` to grad_hidden, summed over the blocks in fp32,
when that ``(N, d)`` fp32 sum is no larger than a block (VOCAB_BLOCK_BYTES: 256 MiB, 16k tokens
at d = 4096); else it recomputes the token chunks for grad_hidden first (a 5th matmul, no such
buffer), as it does for a frozen head (no weight or bias gradient: no blocks at all).

Memory besides the inputs and the gradients themselves: grad_W is allocated before pass 1, whose
token chunks live in its storage (nothing is written there before pass 2), so they are as large
as the token strategy's (up to CHUNK_BYTES, at most d tokens) at no cost in memory; the blocks
then borrow theirs from grad_W's rows not written yet (those after the block), shrinking as those
run out, and only the last classes take an own buffer of 1/VOCAB_TAIL_DIVISOR of a block
(:func:`blocks`). Without a weight gradient to borrow from (a frozen head; the forward
of ``none``, which computes no gradient) chunks and blocks use one own buffer of at most
``VOCAB_BLOCK_BYTES``. Llama-3 8B head (N = 16384, d = 4096, V = 128256, bf16): 4 token chunks of
4096 in grad_W, then 26 blocks (11 of 8192 classes, then 7616 down to 1280, then 1024s); 1002
MiB grad_weight + 128 MiB grad_hidden + a 32 MiB tail buffer, 1163 MiB against 12024 MiB for
``F.linear`` + torch's cross-entropy (``none``: 1387 MiB with grad_hidden's fp32 sum). Cost: the
logits matmul runs twice (4 matmuls of ``N V d`` instead of 3; 5 for ``none`` past that sum's
budget), and the cross-entropy work over the logits twice.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backend import registry
from .._tensors import acc_dtype
from .linear_cross_entropy_sums import _WeightGrad

# At most this many classes per block of the second pass and at most VOCAB_BLOCK_BYTES of logits
# (an (N, cols) buffer); without a weight gradient to borrow from (linear_cross_entropy_tokens.pass1),
# the token chunks of the first pass are capped at the same bytes when chunk_size is not given, so
# one buffer of that size is the whole working memory. 256 MiB: 8192 classes for 16k bf16 tokens
# (matmuls of 16384 x 4096 x 8192 stay efficient).
VOCAB_BLOCK_COLS = 8192
VOCAB_BLOCK_BYTES = {"cuda": 256 << 20, "meta": 256 << 20, "cpu": 32 << 20}
# Pass 2 borrows its block buffer from the weight gradient's rows not written yet (those after the
# block), shrinking the blocks as they run out (a block of c classes needs N c elements: c <= the
# remaining classes x d / (N + d)); below 1/VOCAB_TAIL_DIVISOR of a full block it takes an own
# buffer of that size for the last classes. Blocks are multiples of 16 classes.
VOCAB_TAIL_DIVISOR = 8


def block_cols(n_rows: int, n_cols: int, element_size: int, device: torch.device) -> int:
    """Classes per vocabulary block of ``strategy="vocab"``: VOCAB_BLOCK_COLS, fewer when N is
    large enough that the block would pass VOCAB_BLOCK_BYTES (a multiple of 128, at least 128)."""
    budget = VOCAB_BLOCK_BYTES.get(device.type, VOCAB_BLOCK_BYTES["cpu"])
    fit = budget // max(1, n_rows * element_size)
    cols = min(VOCAB_BLOCK_COLS, n_cols)
    if fit < cols:
        cols = min(cols, max(128, fit // 128 * 128))
    return max(1, cols)


def blocks(hidden: torch.Tensor, grad_w: Optional[torch.Tensor], n_cols: int, align: int = 16):
    """Yields ``(blk, x)``: the vocabulary blocks of pass 2 and an ``(N, len(blk))`` buffer for
    each, in the rows of ``grad_w`` after ``blk`` (not written yet) while they hold it, then in
    one own buffer of a tail block (VOCAB_TAIL_DIVISOR); one own full-block buffer when there is
    no weight gradient to borrow from (``grad_w`` None, or another dtype than the logits').
    Every block but the last has a multiple of ``align`` classes (a power of two <= 128)."""
    n_rows = hidden.shape[0]
    cols = block_cols(n_rows, n_cols, hidden.element_size(), hidden.device)
    borrow = grad_w is not None and grad_w.dtype == hidden.dtype and grad_w.is_contiguous() and n_rows > 0
    flat, d = (grad_w.view(-1), grad_w.shape[1]) if borrow else (None, 0)
    tail = min(cols, max(align, cols // VOCAB_TAIL_DIVISOR // align * align))
    own = None
    start = 0
    while start < n_cols:
        c = min(cols, n_cols - start)
        if borrow:
            fit = (n_cols - start) * d // (n_rows + d) // align * align  # N c <= (n_cols - start - c) d
            if fit >= min(c, tail):  # a whole block, or a shrunk one no smaller than the tail
                c = min(c, fit)
                end = (start + c) * d
                yield slice(start, start + c), flat[end : end + n_rows * c].view(n_rows, c)
                start += c
                continue
            borrow, cols = False, tail
            c = min(cols, n_cols - start)
        if own is None:
            own = hidden.new_empty(n_rows * cols)
        yield slice(start, start + c), own[: n_rows * c].view(n_rows, c)  # contiguous, ragged last
        start += c


def grad_hidden_in_blocks(hidden: torch.Tensor) -> bool:
    """``strategy="vocab"``, backward of ``none``: whether grad_hidden is summed over the blocks,
    i.e. its fp32 ``(N, d)`` sum is no larger than a block (VOCAB_BLOCK_BYTES)."""
    budget = VOCAB_BLOCK_BYTES.get(hidden.device.type, VOCAB_BLOCK_BYTES["cpu"])
    return hidden.numel() * acc_dtype(hidden).itemsize <= budget


def row_terms(target, class_weight, lse, scale, ignore_index: int, keep: float, n_cols: int, acc):
    """Per-row inputs of a gradient computed from the forward's ``lse`` (blocks of classes):
    ``(y, valid, lse, scale, target_term)`` with ``lse`` +inf on ignored rows (so ``p_c = 0``
    whatever the logits; forward left lse = coef = 0 there), ``scale`` (0-dim or (N,)) expanded
    to the rows, 0 on ignored rows and NaN on out-of-range targets, and ``keep * w_y``."""
    y = target.long()
    ignored = y == ignore_index
    valid = ~ignored & (y >= 0) & (y < n_cols)
    bad = ~valid & ~ignored
    lse = lse.masked_fill(ignored, float("inf"))
    scale = scale.to(acc).expand(y.shape[0]).masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
    y_safe = y.masked_fill(~valid, 0)
    target_term = keep * (class_weight[y_safe] if class_weight is not None else torch.ones_like(lse))
    return y, valid, lse, scale, target_term


def block_grads(hidden, weight, bias, target, class_weight, lse, coef, scale, ignore_index, keep, spread, softcap,
                need, backend, grad_w=None):  # fmt: skip
    """Second pass of ``strategy="vocab"``: (grad_hidden, grad_weight, grad_bias) of ``scale *
    loss`` (``scale`` 0-dim or (N,)) by vocabulary blocks, for ``need`` = (hidden, weight, bias)
    (empty where not needed), grad_weight written into ``grad_w`` when given; see the module
    docstring. grad_hidden (the backward of ``none``) is summed over the blocks in fp32."""
    n_rows, n_cols, acc = hidden.shape[0], weight.shape[0], acc_dtype(hidden)
    if grad_w is None:
        grad_w = torch.empty_like(weight) if need[1] else hidden.new_empty(0)
    grad_b = torch.empty_like(bias) if need[2] else hidden.new_empty(0)
    grad_h = _WeightGrad(hidden) if need[0] else None  # sum over blocks of g @ W[blk]: (g.T).T @ W[blk]
    if not any(need):
        return hidden.new_empty(0), grad_w, grad_b
    local = registry.implementation(
        "vocab_parallel_cross_entropy",
        backend if registry.has_implementation("vocab_parallel_cross_entropy", backend) else "eager",
    )
    y, valid, lse, scale, target_term = row_terms(target, class_weight, lse, scale, ignore_index, keep, n_cols, acc)
    for blk, x in blocks(hidden, grad_w if need[1] else None, n_cols):
        if bias is None:
            torch.mm(hidden, weight[blk].t(), out=x)
        else:
            torch.addmm(bias[blk], hidden, weight[blk].t(), out=x)
        owned = valid & (y >= blk.start) & (y < blk.stop)
        y_local = (y - blk.start).masked_fill(~owned, 0)
        target_coef = torch.where(owned, target_term, 0.0)
        w_blk = class_weight[blk] if class_weight is not None else None
        for rows in local.row_chunks(n_rows, x.shape[1]):  # x becomes g in place (rows read first)
            local.local_grad(
                x[rows], lse[rows], coef[rows], y_local[rows], target_coef[rows], w_blk, keep, spread, softcap,
                scale[rows], acc, out=x[rows],
            )  # fmt: skip
        block_products(x, blk, hidden, weight, grad_h, grad_w if need[1] else None, grad_b if need[2] else None)
    x = None  # the last block's buffer, freed before the fp32 sum is rounded
    return (grad_h.result() if grad_h is not None else hidden.new_empty(0)), grad_w, grad_b


def block_products(g, blk: slice, hidden, weight, grad_h, grad_w, grad_b) -> None:
    """The products of one block's gradient ``g`` ``(N, len(blk))``: ``grad_h`` (a _WeightGrad
    over the rows) ``+= g @ W[blk]``, ``grad_w[blk] = g.T @ H`` (one matmul over every token,
    rounded once) and ``grad_b[blk] = g.sum(0)`` in fp32; each skipped when None."""
    if grad_h is not None:
        grad_h.add(g.t(), weight[blk])
    if grad_w is not None:
        torch.mm(g.t(), hidden, out=grad_w[blk])
    if grad_b is not None:
        grad_b[blk] = g.sum(0, dtype=acc_dtype(g))
