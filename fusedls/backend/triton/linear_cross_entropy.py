"""Triton kernels of ``linear_cross_entropy(strategy="fused")``: GEMMs of ``hidden @ weight.T``
whose epilogues do the cross-entropy work on each tile, so no logits reach memory.

The math is that of ``fusedls/backend/eager/linear_cross_entropy.py`` (its docstring has the
derivation); ``fusedls/ops/linear_cross_entropy_fused.py`` drives the kernels. A logits tile is
``BLOCK_N`` rows by ``BLOCK_V`` classes, accumulated in fp32 by ``tl.dot`` over ``BLOCK_K`` steps of
the hidden size (``input_precision="ieee"`` for fp32 inputs: no TF32), and never stored:

* ``linear_cross_entropy_stats_kernel``: program ``(row tile, split)`` sweeps its share of the
  class tiles: per tile the GEMM, then (optionally capped) online max / sum-exp, the target's
  logit and ``sum_c w_c z_c``, and with TILE_MAX each row's tile maximum (bf16 bits rounded up:
  the filter's bound). Each split writes its partials; :func:`row_statistics` merges them in a
  fixed order (no atomics: the same bits every run).
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

from .cross_entropy import _sech2, _tanh
from .launch import launch
from .linear_cross_entropy_products import sparse_products
from .tuning import fused_config, fused_splits

UNSUPPORTED: frozenset[str] = frozenset()

__all__ = ["UNSUPPORTED", "grad_block", "row_statistics", "sparse_products", "tile_shape"]


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
    target_ptr,  # *int (N,) class ids; only ids in [0, V) match a class
    class_weight_ptr,  # *fp32 (V,) class weights (HAS_WEIGHT only)
    part_ptr,  # *fp32 (4, N, n_splits) out: per row and split max m, sum exp(z - m), z_y, sum_c w_c z_c
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
    pid = tl.program_id(0)
    split = pid % n_splits
    rows = (pid // n_splits).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_wz = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, n_tiles)):
        cols = tl.cast(t, tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        z, _ = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, d, softcap,
                            HAS_BIAS, HAS_SOFTCAP, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_m = tl.max(z, 1)
        m_new = tl.maximum(m, tile_m)
        # A row (so far) of -inf: shift by 0 instead of -inf so exp() gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), 1)
        m = m_new
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            z0 = tl.where(col_ok[None, :], z, 0.0)
            if HAS_WEIGHT:
                z0 = z0 * tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0)[None, :]
            sum_wz += tl.sum(z0, 1)
        if TILE_MAX:
            tl.store(tile_max_ptr + rows * n_tiles + t, _round_up_bf16_bits(tile_m), mask=row_ok)
    at = part_ptr + rows * n_splits + split
    plane = tl.cast(n_rows, tl.int64) * n_splits
    tl.store(at, m, mask=row_ok)
    tl.store(at + plane, s, mask=row_ok)
    tl.store(at + 2 * plane, z_y, mask=row_ok)
    tl.store(at + 3 * plane, sum_wz, mask=row_ok)


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
    kept_ptr,  # *int8 (n_row_tiles, n_col_tiles) tiles to write (FILTER only)
    out_ptr,  # *T (N, width) out: scale * dl/dx of the classes [start, start + width)
    stride_out,  # elements between rows of out
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
    pid = tl.program_id(0)
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
        y = tl.load(target_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        # dl/dz_c = coef * p_c - keep * w_y * [c = y] - spread * w_c
        g = coef[:, None] * tl.exp(z - lse[:, None])
        if HAS_SMOOTHING and not FILTER:
            if HAS_WEIGHT:
                g = g - spread * tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0)[None, :]
            else:
                g = g - spread
        g = tl.where(cols[None, :] == y[:, None], g - target_coef[:, None], g)
        if HAS_SOFTCAP:  # dz/dx = 1 - tanh(x / s)^2, without cancellation
            g = g * _sech2(u)
        g = g * scale[:, None]
        out = out_ptr + rows[:, None] * stride_out + local[None, :]
        tl.store(out, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers: the triton backend's implementation of fusedls/backend/eager/linear_cross_entropy.py
# ----------------------------------------------------------------------------------------------


def tile_shape(dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, classes)`` of a logits tile (tuning.FUSED_TILE); the eager backend's TILE must
    match it so that both filter the same tiles."""
    cfg = fused_config()
    return cfg.block_n, cfg.block_v


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit inputs


def row_statistics(hidden, weight, bias, target, class_weight, softcap, smoothing, tile_max):
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    n_cols = weight.shape[0]
    cfg = fused_config()
    n_tiles = triton.cdiv(n_cols, cfg.block_v)
    n_row_tiles = triton.cdiv(n_rows, cfg.block_n)
    splits = fused_splits(hidden.device, n_row_tiles, n_tiles)
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)  # none empty
    part = torch.empty(4, n_rows, splits, dtype=torch.float32, device=hidden.device)
    if n_rows:
        launch(linear_cross_entropy_stats_kernel, (n_row_tiles * splits,),
            hidden, weight, bias if bias is not None else hidden, target,
            class_weight if class_weight is not None else part, part,
            tile_max if tile_max is not None else part,
            n_rows, n_cols, d, n_tiles, splits, per_split, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=smoothing,
            HAS_SOFTCAP=softcap is not None, TILE_MAX=tile_max is not None, PRECISION=_precision(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, **cfg.launch_options(),
        )  # fmt: skip
    m, s, z_y, sum_wz = part
    # lse = M + log sum_j s_j exp(m_j - M) over the splits, in split order
    top = m.amax(1)
    top_ref = torch.where(top == float("-inf"), 0.0, top)
    lse = top + torch.log((s * torch.exp(m - top_ref[:, None])).sum(1))
    return lse, z_y.sum(1), sum_wz.sum(1)


def grad_block(hidden, weight, bias, target, class_weight, lse, coef, target_coef, scale, start, out, keep, spread,
               softcap):  # fmt: skip
    """See :class:`fusedls.backend.protocols.LinearCrossEntropyBackend`."""
    n_rows, d = hidden.shape
    width = out.shape[1]
    if n_rows == 0 or width == 0:
        return
    cfg = fused_config()
    n_row_tiles, n_col_tiles = triton.cdiv(n_rows, cfg.block_n), triton.cdiv(width, cfg.block_v)
    launch(linear_cross_entropy_grad_kernel, (n_row_tiles * n_col_tiles,),
        hidden, weight, bias if bias is not None else hidden, target,
        class_weight if class_weight is not None else lse,
        lse, coef, target_coef, scale, keep.view(torch.int8) if keep is not None else lse,
        out, out.stride(0), n_rows, d, start, width, n_col_tiles, spread, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None, HAS_SMOOTHING=spread != 0.0,
        HAS_SOFTCAP=softcap is not None, FILTER=keep is not None, PRECISION=_precision(hidden.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP=cfg.group, **cfg.launch_options(),
    )  # fmt: skip

