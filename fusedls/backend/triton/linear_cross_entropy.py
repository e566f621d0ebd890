"""Triton kernels of ``linear_cross_entropy(strategy="fused")``: GEMMs of ``hidden @ weight.T``
whose epilogues do the cross-entropy work on each tile, so no logits reach memory.

The math is that of ``fusedls/backend/eager/linear_cross_entropy.py`` (its docstring has the
derivation); ``fusedls/ops/linear_cross_entropy_fused.py`` drives the kernels. A logits tile is
``BLOCK_N`` rows by ``BLOCK_V`` classes, accumulated in fp32 by ``tl.dot`` over ``BLOCK_K`` steps of
the hidden size (``input_precision="ieee"`` for fp32 inputs: no TF32), and never stored:

* ``linear_cross_entropy_stats_kernel``: program ``(row tile, split)`` sweeps its share of the
  class tiles: per tile the GEMM, then (optionally capped) online max / sum-exp and ``sum_c w_c
  z_c``, and with TILE_MAX each row's tile maximum (bf16 bits rounded up: the filter's bound).
  Each split writes its partials; :func:`row_statistics` merges them in a fixed order (no
  atomics: the same bits every run).
* ``linear_cross_entropy_target_kernel``: each row's logit at its target, a row-wise dot.
* ``linear_cross_entropy_grad_kernel``: program ``(row tile, class tile)`` of one block of
  classes: the GEMM again, then ``scale * dl/dx`` written in the input dtype into the block's
  buffer (rounded once). With FILTER it runs only the kept tiles and leaves out the uniform
  smoothing term (added as rank-one terms by the caller).

The products of the gradient blocks are cuBLAS's (exact path) or, with the filter,
``linear_cross_entropy_products.py``'s over the kept tiles only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy_kernels import _sech2, _tanh
from .launch import launch
from .linear_cross_entropy_products import sparse_products
from .tuning import fused_config, fused_splits

UNSUPPORTED: frozenset[str] = frozenset()

__all__ = ["UNSUPPORTED", "grad_block", "row_statistics", "sparse_products", "target_logit", "tile_shape"]


@triton.jit
def _logits_tile(
    hidden_ptr,  # *T (N, d) hidden rows, contiguous
    weight_ptr,  # *T (V, d) the head, contiguous
    bias_ptr,  # *T (V,) (HAS_BIAS only)
    rows,  # int64 [BLOCK_N] row indices of the tile
    cols,  # int64 [BLOCK_V] class indices of the tile
    row_ok,  # [BLOCK_N] rows < N
    col_ok,  # [BLOCK_V] classes inside the range swept
    d,  # hidden size
    softcap,  # s of s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_BIAS: tl.constexpr,  # add the bias
    HAS_SOFTCAP: tl.constexpr,  # return the capped logits
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # classes per tile
    BLOCK_K: tl.constexpr,  # hidden-size step
):
    # (x, u): the fp32 logits of the tile and x / s (the cap's argument, HAS_SOFTCAP) or x.
    h_rows = hidden_ptr + rows[:, None] * d
    w_rows = weight_ptr + cols[:, None] * d
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, d, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks[None, :] < d
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        b = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        u = acc / softcap
        return softcap * _tanh(u), u
    return acc, acc


@triton.jit
def linear_cross_entropy_target_kernel(
    hidden_ptr,  # *T (N, d) hidden rows, contiguous
    weight_ptr,  # *T (V, d) the head, contiguous
    bias_ptr,  # *T (V,) bias (HAS_BIAS only)
    target_ptr,  # *int (N,) class ids
    out_ptr,  # *fp32 (N,) out: h . W_y (+ b_y), 0 where the id is not in [0, V)
    n_rows,  # N
    n_cols,  # V
    d,  # hidden size
    HAS_BIAS: tl.constexpr,  # add the bias
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # hidden-size step
):
    # Each row's logit at its target by a row-wise dot in fp32 (equal to the tiles' up to the order
    # of the sum). Selecting it out of an MMA tile would need a 2-D compare, a predicate per element
    # (64 a thread on 8 warps), which spills.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(target_ptr + rows, mask=rows < n_rows, other=-1).to(tl.int64)
    mine = (rows < n_rows) & (y >= 0) & (y < n_cols)
    y = tl.where(mine, y, 0)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, d, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        ok = mine[:, None] & (ks[None, :] < d)
        a = tl.load(hidden_ptr + rows[:, None] * d + ks[None, :], mask=ok, other=0.0)
        b = tl.load(weight_ptr + y[:, None] * d + ks[None, :], mask=ok, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    x = tl.sum(acc, 1)
    if HAS_BIAS:
        x += tl.load(bias_ptr + y, mask=mine, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.where(mine, x, 0.0), mask=rows < n_rows)


@triton.jit
def _round_up_bf16_bits(x):
    # bf16 bits (int16) of the smallest bf16 >= x: truncating the fp32 bits moves a negative value
    # up already, a positive inexact one gets one ulp more (see eager round_up_bf16_bits).
    bits = x.to(tl.int32, bitcast=True)
    high = (bits >> 16) + ((bits > 0) & ((bits & 0xFFFF) != 0)).to(tl.int32)
    return high.to(tl.int16)


@triton.jit
def linear_cross_entropy_stats_kernel(
    hidden_ptr,  # *T (N, d) hidden rows, contiguous
    weight_ptr,  # *T (V, d) the head, contiguous
    bias_ptr,  # *T (V,) bias (HAS_BIAS only)
    class_weight_ptr,  # *fp32 (V,) class weights (HAS_WEIGHT only)
    part_ptr,  # *fp32 (3, N, n_splits) out: per row and split max m, sum exp(z - m), sum_c w_c z_c
    tile_max_ptr,  # *int16 (N, n_tiles) out (TILE_MAX only): bf16 bits of each row's tile max, rounded up
    n_rows,  # N
    n_cols,  # V
    d,  # hidden size
    n_tiles,  # class tiles: ceil(V / BLOCK_V)
    n_splits,  # programs per row tile; program p: row tile p // n_splits, split p % n_splits
    tiles_per_split,  # class tiles of each split (the last may have fewer)
    softcap,  # s of s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_BIAS: tl.constexpr,  # add the bias
    HAS_WEIGHT: tl.constexpr,  # class weights in sum_c w_c z_c
    HAS_SMOOTHING: tl.constexpr,  # compute sum_c w_c z_c
    HAS_SOFTCAP: tl.constexpr,  # cap the logits
    TILE_MAX: tl.constexpr,  # write the tile maxima
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # classes per tile
    BLOCK_K: tl.constexpr,  # hidden-size step
):
    pid = tl.program_id(0).to(tl.int64)  # every offset derived from it in int64
    split = pid % n_splits
    rows = (pid // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_wz = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, n_tiles)):
        cols = tl.cast(t, tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, d, softcap,
                         HAS_BIAS, HAS_SOFTCAP, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)[0]  # fmt: skip
        # Classes past V have z = 0 exactly (zero weights and bias loaded): no mask in the sums.
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                sum_wz += tl.sum(z * tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0)[None, :], 1)
            else:
                sum_wz += tl.sum(z, 1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_m = tl.max(z, 1)
        m_new = tl.maximum(m, tile_m)
        # A row (so far) of -inf: shift by 0 instead of -inf so exp() gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), 1)
        m = m_new
        if TILE_MAX:
            tl.store(tile_max_ptr + rows * n_tiles + t, _round_up_bf16_bits(tile_m), mask=row_ok)
    at = part_ptr + rows * n_splits + split
    plane = tl.cast(n_rows, tl.int64) * n_splits
    tl.store(at, m, mask=row_ok)
    tl.store(at + plane, s, mask=row_ok)
    tl.store(at + 2 * plane, sum_wz, mask=row_ok)


@triton.jit
def linear_cross_entropy_grad_kernel(
    hidden_ptr,  # *T (N, d) hidden rows, contiguous
    weight_ptr,  # *T (V, d) the head, contiguous
    bias_ptr,  # *T (V,) bias (HAS_BIAS only)
    target_ptr,  # *int (N,) class ids; only ids in [0, V) match a class
    class_weight_ptr,  # *fp32 (V,) class weights (HAS_WEIGHT only)
    lse_ptr,  # *fp32 (N,) log-sum-exp of each row (+inf on ignored rows: p = 0)
    coef_ptr,  # *fp32 (N,) factor of p_c in the gradient
    target_coef_ptr,  # *fp32 (N,) keep * w_y, subtracted at the target (0 on ignored rows)
    scale_ptr,  # *fp32 (N,) factor of each row's gradient (0 ignored, NaN bad target)
    x_y_ptr,  # *fp32 (N,) each row's logit at its target (before the cap)
    kept_ptr,  # *int8 (n_row_tiles, n_col_tiles) tiles to write (FILTER only)
    out_ptr,  # *T (N, width) out: scale * dl/dx of the classes [start, start + width)
    stride_out,  # elements between rows of out (>= width; columns width..stride_out get zeros)
    n_rows,  # N
    d,  # hidden size
    start,  # first class of the block (a multiple of BLOCK_V under FILTER)
    width,  # classes of the block
    n_col_tiles,  # ceil(width / BLOCK_V)
    spread,  # eps / V
    softcap,  # s of s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_BIAS: tl.constexpr,  # add the bias
    HAS_WEIGHT: tl.constexpr,  # class weights in the smoothing term
    HAS_SMOOTHING: tl.constexpr,  # subtract spread * w_c (never under FILTER)
    HAS_SOFTCAP: tl.constexpr,  # the logits were capped
    FILTER: tl.constexpr,  # only the kept tiles
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # classes per tile
    BLOCK_K: tl.constexpr,  # hidden-size step
    GROUP: tl.constexpr,  # row tiles per group of the program order
):
    # Grouped order: GROUP row tiles sweep the class tiles together (hidden rows and head tiles
    # shared in L2).
    pid = tl.program_id(0).to(tl.int64)  # every offset derived from it in int64
    n_row_tiles = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP * n_col_tiles
    first_row_tile = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_row_tiles - first_row_tile, GROUP)
    row_tile = first_row_tile + (pid % per_group) % group_rows
    col_tile = (pid % per_group) // group_rows
    run = True
    if FILTER:
        run = tl.load(kept_ptr + row_tile * n_col_tiles + col_tile) != 0
    if run:
        rows = row_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        local = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = start + local.to(tl.int64)
        row_ok = rows < n_rows
        col_ok = local < width
        z, u = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, d, softcap,
                            HAS_BIAS, HAS_SOFTCAP, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        target_coef = tl.load(target_coef_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        # dl/dz_c = coef * p_c - spread * w_c, and - keep * w_y at the target (below)
        g = coef[:, None] * tl.exp(z - lse[:, None])
        if HAS_SMOOTHING and not FILTER:
            if HAS_WEIGHT:
                g = g - spread * tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0)[None, :]
            else:
                g = g - spread
        if HAS_SOFTCAP:  # dz/dx = 1 - tanh(x / s)^2, without cancellation
            g = g * _sech2(u)
        g = g * scale[:, None]
        out = out_ptr + rows[:, None] * stride_out + local[None, :]
        g = tl.where(col_ok[None, :], g, 0.0)  # the padding of a ragged block's rows: zeros
        tl.store(out, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < stride_out)[None, :])
        # The rows whose target is in this tile: their element there rewritten with the target
        # term (- keep * w_y), from the target logit of linear_cross_entropy_target_kernel (the
        # 2-D compare that would select it in the tile spills), after a barrier so that it lands
        # after the tile's store.
        tile_lo = start + col_tile * BLOCK_V
        y = tl.load(target_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        here = row_ok & (y >= tile_lo) & (y < tl.minimum(tile_lo + BLOCK_V, start + width))
        if tl.max(here.to(tl.int32), 0) > 0:
            x_y = tl.load(x_y_ptr + rows, mask=here, other=0.0)
            z_y = x_y
            if HAS_SOFTCAP:
                z_y = softcap * _tanh(x_y / softcap)
            g_y = coef * tl.exp(z_y - lse)
            if HAS_SMOOTHING and not FILTER:
                if HAS_WEIGHT:
                    g_y = g_y - spread * tl.load(class_weight_ptr + y, mask=here, other=0.0)
                else:
                    g_y = g_y - spread
            g_y = g_y - target_coef
            if HAS_SOFTCAP:
                g_y = g_y * _sech2(x_y / softcap)
            tl.debug_barrier()
            tl.store(out_ptr + rows * stride_out + (y - start), (g_y * scale).to(out_ptr.dtype.element_ty), mask=here)


# ----------------------------------------------------------------------------------------------
# Launchers: the triton backend's implementation of fusedls/backend/eager/linear_cross_entropy.py
# ----------------------------------------------------------------------------------------------


def tile_shape(dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, classes)`` of a logits tile (tuning.FUSED_TILE); the eager backend's TILE must
    match it so that both filter the same tiles."""
    cfg = fused_config(dtype.itemsize)
    return cfg.block_n, cfg.block_v


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit inputs


def row_statistics(hidden, weight, bias, class_weight, softcap, smoothing, tile_max):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    n_cols = weight.shape[0]
    cfg = fused_config(hidden.element_size())
    n_tiles = triton.cdiv(n_cols, cfg.block_v)
    n_row_tiles = triton.cdiv(n_rows, cfg.block_n)
    per_split = triton.cdiv(n_tiles, fused_splits(hidden.device, n_row_tiles, n_tiles))
    splits = triton.cdiv(n_tiles, per_split)  # none empty
    part = torch.empty(3, n_rows, splits, dtype=torch.float32, device=hidden.device)
    if n_rows:
        launch(linear_cross_entropy_stats_kernel, (n_row_tiles * splits,),
            hidden, weight, bias if bias is not None else hidden,
            class_weight if class_weight is not None else part, part,
            tile_max if tile_max is not None else part,
            n_rows, n_cols, d, n_tiles, splits, per_split, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=smoothing,
            HAS_SOFTCAP=softcap is not None, TILE_MAX=tile_max is not None, PRECISION=_precision(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, **cfg.launch_options(),
        )  # fmt: skip
    m, s, sum_wz = part
    # lse = M + log sum_j s_j exp(m_j - M) over the splits, in split order
    top = m.amax(1)
    top_ref = torch.where(top == float("-inf"), 0.0, top)
    return top + torch.log((s * torch.exp(m - top_ref[:, None])).sum(1)), sum_wz.sum(1)


def target_logit(hidden, weight, bias, target):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows:
        cfg = fused_config(hidden.element_size())
        launch(linear_cross_entropy_target_kernel, (triton.cdiv(n_rows, cfg.block_n),),
            hidden, weight, bias if bias is not None else hidden, target, out, n_rows, weight.shape[0], d,
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


def grad_block(hidden, weight, bias, target, class_weight, lse, coef, target_coef, scale, x_y, start, out, keep,
               spread, softcap):  # fmt: skip
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    width = out.shape[1]
    if n_rows == 0 or width == 0:
        return
    cfg = fused_config(hidden.element_size())
    block_n = cfg.grad_block_n(softcap is not None)  # kept's rows per tile under FILTER (never capped)
    n_row_tiles, n_col_tiles = triton.cdiv(n_rows, block_n), triton.cdiv(width, cfg.block_v)
    launch(linear_cross_entropy_grad_kernel, (n_row_tiles * n_col_tiles,),
        hidden, weight, bias if bias is not None else hidden, target,
        class_weight if class_weight is not None else lse,
        lse, coef, target_coef, scale, x_y, keep.view(torch.int8) if keep is not None else lse,
        out, out.stride(0), n_rows, d, start, width, n_col_tiles, spread, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=spread != 0.0,
        HAS_SOFTCAP=softcap is not None, FILTER=keep is not None, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP=cfg.group, num_warps=cfg.grad_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip

