"""Triton kernels of the filtered products of ``linear_cross_entropy(strategy="fused",
filter_eps=...)``: the weight and hidden gradients of one block of classes from the kept tiles
of its gradient ``g`` alone (``linear_cross_entropy.py`` writes only those; the others are never
read). Deterministic: every output tile is owned by one program, which sums its kept tiles in
ascending order with an fp32 accumulator (no atomics).

* ``linear_cross_entropy_dw_kernel``: program ``(class tile, d tile)`` of the block:
  ``grad_weight[c] = sum over kept row tiles of g[rows, c].T @ hidden[rows] - w_c * row_sum``,
  rounded once; with HAS_BIAS the programs of the first d tile also write ``sum of g`` per class.
* ``linear_cross_entropy_dh_kernel``: program ``(row tile, d tile)``: ``grad_hidden[rows] +=
  sum over kept class tiles of g[rows, c] @ weight[c]`` into the fp32 sum over blocks (one
  read-add-write per block, skipped when the row tile keeps nothing in the block).

The kept tiles of each class tile (for dw) and of each row tile (for dh) are listed first, in
ascending order, by a stable sort of the block's mask on the device (no host synchronisation);
each program loops over its count of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .tuning import fused_config


@triton.jit
def linear_cross_entropy_dw_kernel(
    g_ptr,  # *T (N, width) gradient of the block (only the kept tiles are read)
    stride_g,  # elements between rows of g, a multiple of 16 (columns width..stride_g: zeros)
    hidden_ptr,  # *T (N, d) hidden rows, contiguous
    order_ptr,  # *int32 (n_row_tiles, n_col_tiles): per class tile (column), its kept row tiles first
    count_ptr,  # *int32 (n_col_tiles,) kept row tiles per class tile
    grad_w_ptr,  # *T (width, d) out: the block's rows of grad_weight, contiguous
    grad_b_ptr,  # *fp32 (width,) out: sum of g per class (HAS_BIAS only)
    row_sum_ptr,  # *fp32 (d,) sum_n u_n h_n of the uniform part
    class_weight_ptr,  # *fp32 (V,) class weights (HAS_WEIGHT only)
    n_rows,  # N
    d,  # hidden size
    start,  # first class of the block
    width,  # classes of the block
    n_col_tiles,  # ceil(width / BLOCK_V)
    n_d_tiles,  # ceil(d / BLOCK_D); program p: class tile p // n_d_tiles, d tile p % n_d_tiles
    HAS_WEIGHT: tl.constexpr,  # class weights scale the rank-one term
    HAS_BIAS: tl.constexpr,  # also the bias gradient
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # classes per tile
    BLOCK_D: tl.constexpr,  # hidden-size columns per program
):
    pid = tl.program_id(0).to(tl.int64)  # every offset derived from it in int64
    col_tile = pid // n_d_tiles
    d_tile = pid % n_d_tiles
    local = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < width
    g_ok = local < stride_g  # 16-aligned: vector loads of g (the padding holds zeros)
    dims = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in range(0, tl.load(count_ptr + col_tile)):
        row_tile = tl.load(order_ptr + i * n_col_tiles + col_tile)
        rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        g = tl.load(g_ptr + rows[:, None] * stride_g + local[None, :], mask=row_ok[:, None] & g_ok[None, :],
                    other=0.0)  # fmt: skip
        h = tl.load(hidden_ptr + rows[:, None] * d + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)
        if HAS_BIAS:
            g_sum += tl.sum(g.to(tl.float32), 0)
    w_c = 1.0
    if HAS_WEIGHT:
        w_c = tl.load(class_weight_ptr + start + local, mask=col_ok, other=0.0)[:, None]
    acc -= w_c * tl.load(row_sum_ptr + dims, mask=dim_ok, other=0.0)[None, :]
    out = grad_w_ptr + local.to(tl.int64)[:, None] * d + dims[None, :]
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])
    if HAS_BIAS:
        if d_tile == 0:
            tl.store(grad_b_ptr + local, g_sum, mask=col_ok)


@triton.jit
def linear_cross_entropy_dh_kernel(
    g_ptr,  # *T (N, width) gradient of the block (only the kept tiles are read)
    stride_g,  # elements between rows of g, a multiple of 16 (columns width..stride_g: zeros)
    weight_ptr,  # *T (V, d) the head, contiguous
    order_ptr,  # *int32 (n_row_tiles, n_col_tiles): per row tile (row), its kept class tiles first
    count_ptr,  # *int32 (n_row_tiles,) kept class tiles per row tile
    grad_h_ptr,  # *fp32 (N, d) in/out: the sum over blocks of g @ weight[block]
    n_rows,  # N
    d,  # hidden size
    start,  # first class of the block
    width,  # classes of the block
    n_col_tiles,  # ceil(width / BLOCK_V)
    n_d_tiles,  # ceil(d / BLOCK_D); program p: row tile p // n_d_tiles, d tile p % n_d_tiles
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # classes per tile
    BLOCK_D: tl.constexpr,  # hidden-size columns per program
):
    pid = tl.program_id(0).to(tl.int64)  # every offset derived from it in int64
    row_tile = pid // n_d_tiles
    d_tile = pid % n_d_tiles
    rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    dims = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    count = tl.load(count_ptr + row_tile)
    if count > 0:
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for i in range(0, count):
            local = tl.load(order_ptr + row_tile * n_col_tiles + i) * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = local < width
            # 16-aligned mask: vector loads of g (its padding holds zeros, the head's rows are masked)
            g = tl.load(g_ptr + rows[:, None] * stride_g + local[None, :], mask=row_ok[:, None] & (local < stride_g)[None, :],
                        other=0.0)  # fmt: skip
            cols = start + local.to(tl.int64)
            w = tl.load(weight_ptr + cols[:, None] * d + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)  # fmt: skip
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
        at = grad_h_ptr + rows[:, None] * d + dims[None, :]
        ok = row_ok[:, None] & dim_ok[None, :]
        tl.store(at, tl.load(at, mask=ok, other=0.0) + acc, mask=ok)


def sparse_products(g, keep, hidden, weight, start, grad_weight, grad_hidden, grad_bias, row_sum, class_weight):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    width = g.shape[1]
    if width == 0:
        return
    cfg = fused_config(hidden.element_size())
    n_row_tiles, n_col_tiles = keep.shape
    n_d_tiles = triton.cdiv(d, cfg.block_d)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, num_warps=cfg.product_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    skipped = (~keep).to(torch.int8)
    if grad_weight is not None or grad_bias is not None:
        order = torch.argsort(skipped, dim=0, stable=True).to(torch.int32)
        count = keep.sum(0, dtype=torch.int32)
        out_w = grad_weight if grad_weight is not None else torch.empty(width, d, dtype=hidden.dtype,
                                                                          device=hidden.device)  # fmt: skip
        launch(linear_cross_entropy_dw_kernel, (n_col_tiles * n_d_tiles,),
            g, g.stride(0), hidden, order, count, out_w, grad_bias if grad_bias is not None else row_sum, row_sum,
            class_weight if class_weight is not None else row_sum,
            n_rows, d, start, width, n_col_tiles, n_d_tiles,
            HAS_WEIGHT=class_weight is not None, HAS_BIAS=grad_bias is not None, PRECISION=precision, **blocks,
        )  # fmt: skip
    if grad_hidden is not None and n_rows:
        order = torch.argsort(skipped, dim=1, stable=True).to(torch.int32)
        count = keep.sum(1, dtype=torch.int32)
        launch(linear_cross_entropy_dh_kernel, (n_row_tiles * n_d_tiles,),
            g, g.stride(0), weight, order, count, grad_hidden, n_rows, d, start, width, n_col_tiles, n_d_tiles,
            PRECISION=precision, **blocks,
        )  # fmt: skip
