"""``linear_cross_entropy(strategy="fused")``: the loss without logits, and gradients with
optional tile filtering (``filter_eps``) that keeps label smoothing exact.

Forward (``row_statistics`` of the ``linear_cross_entropy`` backend: a Triton GEMM whose
epilogue does the cross-entropy work, or its eager twin): one sweep over tiles of ``hidden @
weight.T (+ bias)`` that stay on chip gives per row ``lse`` and ``sum_c w_c z_c``, and
``target_logit`` (a row-wise dot) the target's logit, from which :func:`_finish` forms the loss and the gradient coefficient ``coef`` of every option
(smoothing, class weights, z-loss, soft cap, ignored rows, NaN rows for bad class ids) as the
other strategies do. One ``N V d`` matmul, nothing ``(N, V)``-sized in memory.

Gradients (``mean``/``sum``: in forward, as the other strategies; ``none``: in backward with the
per-row factors), classes-outer as ``strategy="vocab"`` (``linear_cross_entropy_vocab.blocks``:
each block's buffer lives in the rows of ``grad_weight`` not written yet): per block the backend's
``grad_block`` recomputes the block's tiles and writes ``g = scale * dl/dx`` (a GEMM with a
gradient epilogue), then ``grad_weight[blk] = g.T @ H`` (one cuBLAS matmul over every token, fp32
accumulation inside, written once in the weight dtype: no fp32 ``(V, d)`` sum), ``grad_hidden +=
g @ W[blk]`` into an fp32 ``(N, d)`` sum, and ``grad_bias[blk] = g.sum(0)``. Three more matmuls:
four ``N V d`` matmuls in all, the fewest an exact fp32 weight gradient allows without an fp32
``(V, d)`` buffer (docs/linear_cross_entropy.md).

Filtering (``filter_eps > 0``): the gradient ``g_nc = scale_n (A_nc - spread w_c)`` splits into the
sparse part ``A_nc = coef_n p_nc - keep w_yn [c = y_n]`` and the uniform part, whose products are
rank-one and added exactly (:func:`_rank_one`): ``grad_weight_c -= w_c sum_n u_n h_n``,
``grad_hidden_n -= u_n sum_c w_c W_c``, ``grad_bias_c -= w_c sum_n u_n`` with ``u_n = scale_n *
spread`` (0 on ignored rows, NaN on bad ones). A tile of ``A`` is skipped, neither recomputed nor
multiplied, when forward's per-(row, tile) maxima prove ``|coef_n| p_nc < filter_eps`` for every
element and no row's target is in it (:func:`_kept_tiles`); the backend's ``sparse_products``
multiply the kept tiles alone. The error is at most ``filter_eps`` times the row's factor per
skipped element; the soft cap multiplies the uniform part by ``sech^2`` per element (not
rank-one), so ``filter_eps`` with ``softcap`` is refused. ``none`` recomputes the maxima in its
backward (one more logits-free sweep) instead of keeping ``N x V / classes`` of them between the
passes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..backend import registry
from .._tensors import acc_dtype
from ._custom_op import custom_op
from ._checks import check_float_at_least
from ._loss import check_target_values
from . import linear_cross_entropy_vocab as vocab
from .linear_cross_entropy_sums import _WeightGrad

# strategy="auto" takes "fused" only once a GPU run has measured it: the fused path's forward +
# backward time over the token chunks' on the Llama-3 8B head (bf16, 16k tokens), from
# benchmarks/tune_linear_cross_entropy.py. None: not measured, never picked.
FUSED_TIME_VS_TOKENS: Optional[float] = None
# Paths within this fraction of each other's time count as equally fast: the smaller memory wins.
TIME_TIE = 0.03
_ROW_SUM_ROWS = 4096  # rows per fp32 chunk of the rank-one sums (64 MiB temporaries at d = 4096)


def check_filter_eps(filter_eps, softcap, strategy: str) -> float:
    """``filter_eps`` as a float (0.0: off); it needs ``strategy`` "fused" or "auto" and no soft cap."""
    if filter_eps is None:
        return 0.0
    eps = check_float_at_least("filter_eps", filter_eps, 0.0, strict=True)
    if strategy not in ("fused", "auto"):
        raise ValueError(f"filter_eps needs strategy='fused' (or 'auto'), got strategy={strategy!r}")
    if softcap is not None:
        raise ValueError(
            "filter_eps cannot be combined with softcap: the cap's derivative multiplies the uniform "
            "smoothing part per element, which is then not rank-one; pass filter_eps=None"
        )
    return eps


def check_call(call, return_accuracy: bool) -> None:
    """The fused path takes class-id targets through one ``(C, d)`` head, without the accuracy
    (``call``: a :class:`~fusedls.ops.linear_cross_entropy_args.Parsed`)."""
    if call.prob:
        raise ValueError("strategy='fused' (and filter_eps) takes class-id targets, got probabilities")
    if len(call.heads) > 1:
        raise ValueError("strategy='fused' (and filter_eps) takes a (C, d) linear_weight, got a K-dimensional one")
    if return_accuracy:
        raise ValueError("strategy='fused' (and filter_eps) does not compute return_accuracy; use strategy='tokens', "
                         "'vocab' or 'auto' without filter_eps")  # fmt: skip


def pick(choice: str, weight: torch.Tensor, n_rows: int, tokens_bytes: int) -> str:
    """``strategy="auto"`` among the paths by the measured model: the chunks' choice (``choice``,
    "tokens" or "vocab") unless the fused path is measured (FUSED_TIME_VS_TOKENS) and no slower
    than it, then the one with less memory among those within TIME_TIE of the fastest.
    ``tokens_bytes``: the token chunks' working memory (fp32 sum + a chunk)."""
    if FUSED_TIME_VS_TOKENS is None:
        return choice
    vocab_time = 1.0 + 1.0 / 3.0  # four matmuls against three: the vocab blocks' model
    times = {"tokens": 1.0, "vocab": vocab_time, "fused": FUSED_TIME_VS_TOKENS}
    if choice == "vocab":  # the token chunks would need more memory than the logits: out
        times.pop("tokens")
    fastest = min(times.values())
    n_cols, d = weight.shape
    extra = {"tokens": tokens_bytes, "vocab": 0, "fused": n_rows * d * acc_dtype(weight).itemsize}
    near = [name for name, t in times.items() if t <= fastest * (1.0 + TIME_TIE)]
    return min(near, key=lambda name: (extra[name], times[name]))


# ---------------------------------------------------------------------------------- custom ops


@custom_op("fusedls::linear_cross_entropy_fused_fwd", mutates_args=())
def linear_cross_entropy_fused_fwd(
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
    filter_eps: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, coef) per row and, when ``grad_scale`` is given, the gradients (hidden,
    weight, bias) times it (empty where not asked for); ``filter_eps`` 0: exact gradients."""
    # the eager backend on CPU raises for a bad class id, as the eager cross-entropy does (no sync there)
    check_target_values(target, weight.shape[0], ignore_index, always=backend == "eager" and target.device.type == "cpu")
    impl = registry.implementation("linear_cross_entropy", backend)
    write = grad_scale is not None
    need = tuple(n and write for n in (need_hidden, need_weight, need_bias))
    tile_max = _tile_max_buffer(impl, hidden, weight) if filter_eps and any(need) else None
    lse, sum_wz = impl.row_statistics(hidden, weight, bias, class_weight, softcap, spread != 0.0, tile_max)
    x_y = impl.target_logit(hidden, weight, bias, target)
    z_y = x_y if softcap is None else softcap * torch.tanh(x_y / softcap)
    loss, lse, coef = _finish(lse, z_y, sum_wz, target, class_weight, ignore_index, keep, spread, z_loss,
                              weight.shape[0])  # fmt: skip
    grads = _block_grads(impl, hidden, weight, bias, target, class_weight, lse, coef, grad_scale, ignore_index, keep,
                         spread, softcap, filter_eps, tile_max, x_y, need)  # fmt: skip
    return loss, lse, coef, *grads


@linear_cross_entropy_fused_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, grad_scale, ignore_index, keep, spread, z_loss, softcap, filter_eps,
      need_hidden, need_weight, need_bias, backend):  # fmt: skip
    row = hidden.new_empty(hidden.shape[0], dtype=acc_dtype(hidden))
    write = grad_scale is not None
    return (row, torch.empty_like(row), torch.empty_like(row),
            *_empty_grads(hidden, weight, bias, (need_hidden and write, need_weight and write, need_bias and write),
                          like=True))  # fmt: skip


@custom_op("fusedls::linear_cross_entropy_fused_bwd", mutates_args=())
def linear_cross_entropy_fused_bwd(
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
    filter_eps: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (hidden, weight, bias) for per-row upstream factors ``grad_loss`` (fp32 (N,))."""
    impl = registry.implementation("linear_cross_entropy", backend)
    need = (need_hidden, need_weight, need_bias)
    if not any(need):
        return _empty_grads(hidden, weight, bias, need)
    tile_max = None
    if filter_eps:  # the maxima again: one more sweep, nothing kept since forward
        tile_max = _tile_max_buffer(impl, hidden, weight)
        impl.row_statistics(hidden, weight, bias, class_weight, softcap, False, tile_max)
    x_y = impl.target_logit(hidden, weight, bias, target)  # N numbers, recomputed rather than kept
    return _block_grads(impl, hidden, weight, bias, target, class_weight, lse, coef, grad_loss, ignore_index, keep,
                        spread, softcap, filter_eps, tile_max, x_y, need)  # fmt: skip


@linear_cross_entropy_fused_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, lse, coef, ignore_index, keep, spread, softcap,
      filter_eps, need_hidden, need_weight, need_bias, backend):  # fmt: skip
    return _empty_grads(hidden, weight, bias, (need_hidden, need_weight, need_bias), like=True)


# ----------------------------------------------------------------------------------- forward


def _tile_max_buffer(impl, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    cols = impl.tile_shape(hidden.dtype)[1]
    return torch.empty(hidden.shape[0], -(-weight.shape[0] // cols), dtype=torch.int16, device=hidden.device)


def _finish(lse, z_y, sum_wz, target, class_weight, ignore_index, keep, spread, z_loss, n_cols):
    """(loss, lse, coef) per row from the sweep's statistics (formulas in
    ``fusedls/backend/eager/linear_cross_entropy.py``): 0 on ignored rows, NaN loss on bad ids."""
    y = target.long()
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= n_cols)) & ~ignored
    w_y = keep if class_weight is None else keep * class_weight[y.masked_fill(ignored | bad, 0)]
    loss = w_y * (lse - z_y)
    coef = torch.ones_like(lse) * w_y
    if spread != 0.0:
        total = n_cols if class_weight is None else class_weight.sum()
        loss = loss + spread * (total * lse - sum_wz)
        coef = coef + spread * total
    if z_loss != 0.0:
        loss = loss + z_loss * lse * lse
        coef = coef + (2.0 * z_loss) * lse
    loss = loss.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
    return loss, lse.masked_fill(ignored, 0.0), coef.masked_fill(ignored, 0.0)


# --------------------------------------------------------------------------------- gradients


def _empty_grads(hidden, weight, bias, need, like=False):
    empty = hidden.new_empty(0)
    if not like:
        return empty, empty, empty
    return (torch.empty_like(hidden) if need[0] else empty, torch.empty_like(weight) if need[1] else empty,
            torch.empty_like(bias) if need[2] else empty)  # fmt: skip


def _kept_tiles(tile_max, lse, coef, valid, y, start, width, filter_eps, tile):
    """Bool ``(row tiles, class tiles)`` of the block ``[start, start + width)``: a tile is kept
    when a row of it may have ``|coef| p >= filter_eps`` there (``p <= exp(tile max - lse)``) or has
    its target there. No host synchronisation."""
    rows_t, cols_t = tile
    n_rows = lse.shape[0]
    first, n_tiles = start // cols_t, -(-width // cols_t)
    bound = tile_max[:, first : first + n_tiles].view(torch.bfloat16).to(lse.dtype)
    threshold = lse + math.log(filter_eps) - coef.abs().log()
    big = ~(bound < threshold[:, None]) & valid[:, None]  # NaN bounds are kept
    n_row_tiles = -(-n_rows // rows_t)
    big = torch.nn.functional.pad(big, (0, 0, 0, n_row_tiles * rows_t - n_rows))
    kept = big.view(n_row_tiles, rows_t, n_tiles).any(1)
    owned = valid & (y >= start) & (y < start + width)
    slot = (torch.arange(n_rows, device=y.device) // rows_t) * n_tiles + (y - start).clamp(0, width - 1) // cols_t
    flat = torch.zeros(kept.numel() + 1, dtype=torch.bool, device=y.device)
    flat.index_fill_(0, slot.masked_fill(~owned, kept.numel()), True)  # rows not owning: the spare slot
    return kept | flat[:-1].view_as(kept)


def _aligned_rows(g: torch.Tensor) -> torch.Tensor:
    """A ragged last block's buffer re-viewed with rows 16 elements aligned (vector loads of the
    kernels; padding beyond its width), where its storage has room (its own buffer, which is
    a whole block)."""
    n_rows, width = g.shape
    padded = -(-width // 16) * 16
    if padded == width or n_rows == 0:
        return g
    room = g.untyped_storage().nbytes() // g.element_size() - g.storage_offset()
    return torch.as_strided(g, g.shape, (padded, 1)) if room >= n_rows * padded else g


def _weighted_row_sum(rows: torch.Tensor, coefs: torch.Tensor | None, acc) -> torch.Tensor:
    """``sum_r coefs_r rows_r`` ``(d,)`` in ``acc`` (``coefs`` None: all 1), in row chunks."""
    if coefs is None:
        return rows.sum(0, dtype=acc)
    out = torch.zeros(rows.shape[1], dtype=acc, device=rows.device)
    for start in range(0, rows.shape[0], _ROW_SUM_ROWS):
        part = slice(start, start + _ROW_SUM_ROWS)
        out += coefs[part] @ rows[part].to(acc)
    return out


def _rank_one(hidden, weight, class_weight, scale, spread, acc):
    """``(u, sum_n u_n h_n, sum_c w_c W_c)`` of the uniform part ``-u_n w_c``, ``u = scale * spread``."""
    u = scale * spread
    return u, _weighted_row_sum(hidden, u, acc), _weighted_row_sum(weight, class_weight, acc)


def _block_grads(impl, hidden, weight, bias, target, class_weight, lse, coef, scale, ignore_index, keep, spread,
                 softcap, filter_eps, tile_max, x_y, need):  # fmt: skip
    """(grad_hidden, grad_weight, grad_bias) of ``scale * loss`` by blocks of classes (module
    docstring); empty where not in ``need``."""
    if not any(need):
        return _empty_grads(hidden, weight, bias, need)
    n_rows, n_cols, acc = hidden.shape[0], weight.shape[0], acc_dtype(hidden)
    y, valid, lse_inf, scale, target_term = vocab.row_terms(target, class_weight, lse, scale, ignore_index, keep,
                                                            n_cols, acc)  # fmt: skip
    target_coef = torch.where(valid, target_term, 0.0)
    grad_w = torch.empty_like(weight) if need[1] else hidden.new_empty(0)
    grad_b = torch.zeros(n_cols, dtype=acc, device=hidden.device) if need[2] else None
    tile = impl.tile_shape(hidden.dtype)
    sparse = bool(filter_eps)
    if sparse:
        u, row_sum, class_sum = _rank_one(hidden, weight, class_weight, scale, spread, acc)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need[0] else None
    else:
        grad_h = _WeightGrad(hidden) if need[0] else None  # sum over blocks of g @ W[blk]: (g.T).T @ W[blk]
    for blk, g in vocab.blocks(hidden, grad_w if need[1] else None, n_cols, align=tile[1]):
        g = _aligned_rows(g)
        kept = _kept_tiles(tile_max, lse, coef, valid, y, blk.start, g.shape[1], filter_eps, tile) if sparse else None
        impl.grad_block(hidden, weight, bias, target, class_weight, lse_inf, coef, target_coef, scale, x_y, blk.start,
                        g, kept, spread, softcap)  # fmt: skip
        if sparse:
            impl.sparse_products(g, kept, hidden, weight, blk.start, grad_w[blk] if need[1] else None, grad_h,
                                 grad_b[blk] if need[2] else None, row_sum, class_weight)  # fmt: skip
        else:
            vocab.block_products(g, blk, hidden, weight, grad_h, grad_w if need[1] else None, grad_b)
    g = None  # the last block's buffer, freed before the fp32 sum is rounded
    if sparse:  # the uniform part's rank-one terms, in fp32 before the one rounding
        if grad_h is not None:
            grad_h.addr_(u, class_sum, alpha=-1.0)
        if grad_b is not None:
            grad_b.sub_((class_weight if class_weight is not None else 1.0) * u.sum())
        grad_h_out = grad_h.to(hidden.dtype) if grad_h is not None else hidden.new_empty(0)
    else:
        grad_h_out = grad_h.result() if grad_h is not None else hidden.new_empty(0)
    grad_b_out = grad_b.to(bias.dtype) if grad_b is not None else hidden.new_empty(0)
    return grad_h_out, grad_w, grad_b_out
