"""Eager (pure PyTorch) backend of ``linear_cross_entropy(strategy="fused")``: the Triton kernels'
tiling and math in torch, the reference the tests hold them to and the fallback off the GPU.

A ``LinearCrossEntropyBackend`` (``fusedls/backend/protocols.py``). Notation for one row ``n``:
logits ``x_c = h . W_c + b_c`` formed in fp32 from the inputs as they are (never rounded to the
input dtype, unlike a torch matmul's output), ``z_c = s * tanh(x_c / s)`` with the soft cap
``s`` (else ``z = x``), ``p_c = exp(z_c - lse)``, class weights ``w`` (1 without), ``W = sum_c
w_c``, ``keep = 1 - eps``, ``spread = eps / V``, z-loss factor ``lam``:

    l       = keep * w_y * (lse - z_y) + spread * (W * lse - sum_c w_c z_c) + lam * lse^2
    dl/dz_c = coef * p_c - keep * w_y * [c = y] - spread * w_c,
    coef    = keep * w_y + spread * W + 2 * lam * lse,      dl/dx_c = dl/dz_c * sech^2(x_c / s)

so the forward needs per row only ``lse`` and ``sum_c w_c z_c`` (:func:`row_statistics`, one sweep
over the tiles of classes: the logits are never stored) and ``z_y`` (:func:`target_logit`, a
row-wise dot), and the gradient of any tile is formed from ``lse`` and ``coef`` alone
(:func:`grad_block`; the vocabulary-parallel local gradient on a slice of the classes).

Filtering (``filter_eps``, ``fusedls/ops/linear_cross_entropy_fused.py``): without the cap the
gradient splits into a sparse part ``A_nc = coef_n p_nc - keep w_y [c = y]`` and a uniform part
``-spread * w_c`` (times the row's factor), whose products are rank-one; a tile of ``A`` is skipped
when every ``|coef_n| p_nc < filter_eps`` and no row's target is in it. ``tile_max`` bounds ``p``
per (row, tile) without the logits: ``p_nc <= exp(max_c z_nc - lse_n)``. :func:`sparse_products`
multiplies only the kept tiles (here: the skipped tiles zeroed, then dense matmuls: the same sums).

Tiles are ``TILE`` (rows, classes), the triton backend's (``fusedls/backend/triton/tuning.py``),
so the filter skips the same tiles on both; the statistics sweep takes ``_SWEEP_TILES`` tiles of
classes per matmul and the gradients ``_ROW_ELEMENTS`` logits per row chunk (fp32 temporaries).
"""

from __future__ import annotations

import torch

from ..._tensors import acc_dtype
from .vocab_parallel_cross_entropy import capped, local_grad

UNSUPPORTED: frozenset[str] = frozenset()

TILE = {2: (128, 128), 4: (64, 64)}  # (rows, classes) of a logits tile by element size: triton's FUSED_TILE
_SWEEP_TILES = 64  # tiles of classes per matmul of the statistics sweep (fewer, larger matmuls)
_ROW_ELEMENTS = 1 << 22  # logits per row chunk of the gradients: 16 MiB fp32 temporaries


def tile_shape(dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, classes)`` of one logits tile (the filter's unit); fp64 takes fp32's."""
    return TILE[2 if dtype.itemsize <= 2 else 4]


def _logits(hidden, weight, bias, cols: slice, rows: slice = slice(None)) -> torch.Tensor:
    """``hidden[rows] @ weight[cols].T + bias[cols]`` in the accumulation dtype (fp32 products of
    the rounded inputs, as the kernels' ``tl.dot``), never rounded to the input dtype."""
    acc = acc_dtype(hidden)
    x = hidden[rows].to(acc) @ weight[cols].to(acc).t()
    return x if bias is None else x.add_(bias[cols].to(acc))


def round_up_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bf16 bits (int16) of the smallest bf16 ``>= x`` for fp32 ``x`` (an upper bound that costs
    2 bytes): truncation moves a negative value up already, a positive inexact one gets 1 ulp more
    (the largest finite values round to +inf; NaN stays NaN or becomes +-inf)."""
    xf = x.float()
    if x.dtype != torch.float32:  # fp64: the fp32 value rounded to nearest may lie below x
        xf = torch.where(xf.to(x.dtype) < x, torch.nextafter(xf, xf.new_tensor(float("inf"))), xf)
    bits = xf.view(torch.int32)
    high = bits >> 16
    high = high + ((bits > 0) & ((bits & 0xFFFF) != 0)).to(torch.int32)
    return high.to(torch.int16)


def row_statistics(hidden, weight, bias, class_weight, softcap, smoothing, tile_max):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden)
    lse = torch.full((n_rows,), float("-inf"), dtype=acc, device=hidden.device)
    sum_wz = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    tile_cols = tile_shape(hidden.dtype)[1]
    step = tile_cols * _SWEEP_TILES
    for start in range(0, n_cols if n_rows else 0, step):
        cols = slice(start, min(start + step, n_cols))
        z = capped(_logits(hidden, weight, bias, cols), softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
        if smoothing:
            sum_wz += z.sum(1) if class_weight is None else z @ class_weight[cols].to(acc)
        if tile_max is not None:
            pad = -z.shape[1] % tile_cols
            tiles = torch.nn.functional.pad(z, (0, pad), value=float("-inf")).view(n_rows, -1, tile_cols)
            first = start // tile_cols
            tile_max[:, first : first + tiles.shape[1]] = round_up_bf16_bits(tiles.amax(2))
    return lse, sum_wz


def target_logit(hidden, weight, bias, target):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend` (a row-wise dot in fp32)."""
    acc = acc_dtype(hidden)
    y = target.long()
    mine = (y >= 0) & (y < weight.shape[0])
    y = y.masked_fill(~mine, 0)
    x = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    step = max(1, _ROW_ELEMENTS // max(hidden.shape[1], 1))
    for begin in range(0, hidden.shape[0], step):
        rows = slice(begin, begin + step)
        x[rows] = (hidden[rows].to(acc) * weight[y[rows]].to(acc)).sum(1)
    if bias is not None:
        x += bias[y].to(acc)
    return x.masked_fill_(~mine, 0.0)


def _row_chunks(n_rows: int, n_cols: int, rows_per_tile: int):
    """Slices of whole row tiles holding about _ROW_ELEMENTS logits of ``n_cols`` classes."""
    step = max(1, _ROW_ELEMENTS // max(n_cols * rows_per_tile, 1)) * rows_per_tile
    for begin in range(0, n_rows, step):
        yield slice(begin, min(begin + step, n_rows))


def tile_mask(keep: torch.Tensor, rows: slice, n_cols: int, tile: tuple[int, int]) -> torch.Tensor:
    """The element mask ``(len(rows), n_cols)`` of the kept tiles of ``keep`` (row chunk ``rows``
    starting at a whole row tile)."""
    tile_rows, tile_cols = tile
    first, last = rows.start // tile_rows, -(-rows.stop // tile_rows)
    mask = keep[first:last].repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)
    return mask[: rows.stop - rows.start, :n_cols]


def grad_block(hidden, weight, bias, target, class_weight, lse, coef, target_coef, scale, x_y, start, out, keep,
               spread, softcap):  # fmt: skip
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend` (skipped tiles get zeros; the
    target's logit is taken from the block's logits, ``x_y`` is not needed)."""
    n_rows, width = out.shape
    cols = slice(start, start + width)
    y = target.long()
    owned = (y >= cols.start) & (y < cols.stop)
    y_local = (y - cols.start).masked_fill(~owned, 0)
    t_coef = torch.where(owned, target_coef, 0.0)
    w_blk = class_weight[cols] if class_weight is not None else None
    acc = acc_dtype(hidden)
    tile = tile_shape(hidden.dtype)
    for rows in _row_chunks(n_rows, width, tile[0]):
        x = _logits(hidden, weight, bias, cols, rows)
        g = local_grad(x, lse[rows], coef[rows], y_local[rows], t_coef[rows], w_blk, 1.0,
                       spread if keep is None else 0.0, softcap, scale[rows], acc)[0]  # fmt: skip
        if keep is not None:
            g.masked_fill_(~tile_mask(keep, rows, width, tile), 0.0)
        out[rows] = g


def sparse_products(g, keep, hidden, weight, start, grad_weight, grad_hidden, grad_bias, row_sum, class_weight):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`: the skipped tiles of ``g``
    (whose values may be anything) are replaced by zeros, then dense products in fp32."""
    width = g.shape[1]
    cols = slice(start, start + width)
    acc = acc_dtype(hidden)
    dense = torch.where(tile_mask(keep, slice(0, g.shape[0]), width, tile_shape(hidden.dtype)), g.to(acc), 0.0)
    if grad_hidden is not None:
        grad_hidden += dense @ weight[cols].to(acc)
    if grad_bias is not None:
        grad_bias.copy_(dense.sum(0))
    if grad_weight is not None:
        w_c = class_weight[cols, None] if class_weight is not None else 1.0
        grad_weight.copy_(dense.t() @ hidden.to(acc) - w_c * row_sum[None, :])

