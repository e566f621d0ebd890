"""Triton kernels of dropout, dropout + residual add, and dropout + add + RMSNorm / LayerNorm.

Randomness. The data is seen as ``(R, N)`` rows (N: its last dimension). One Philox-4x32-10 call
(``tl.randint4x``, keyed by the 64-bit ``seed``) gives four 32-bit words, eight 16-bit draws:
element ``(r, c)`` takes the half ``c % 2`` of word ``(c % 8) // 2`` of the call whose counter is
``r * ceil(N / 8) + c // 8`` (int64, so no counter repeats below 2^64 elements), and is kept iff
that draw ``u`` in ``[0, 2^16)`` is ``>= t = round(p * 2^16)`` (``protocols.dropout_threshold``:
``P(drop) = t / 2^16``, p with 16 bits of resolution). Every row starts on its own counter, so the
mask is a function of (seed, r, c, N) alone: not of the tile, the warps or the kernel that draws
it, and the eager and cpp backends draw the same bits. The seed is an int64 device tensor drawn
from torch's generator and loaded in-kernel (no host synchronisation); backward regenerates the
mask and nothing of it is saved. One Philox call per 8 elements (not one per element): ~10 integer
instructions per element, below the memory time of a copy on an H100.

Values (torch's formula, computed in fp32 and rounded once): ``dropout(x) = x * m`` with
``m = 1/(1-p)`` where kept and ``0`` where dropped (so a dropped NaN stays NaN and a dropped
negative gives -0, as in torch). ``dropout_add``: ``out = residual + (x + bias) * m``.

Norms, per row of N elements (``h = residual + x * m``, rounded to its dtype and then read back
in fp32, as the unfused composition normalises the rounded sum; ``w`` weight (1 when there is
none), ``b`` bias (0 when there is none)):

  RMSNorm:   rstd = 1 / sqrt(mean(h^2) + eps),          xhat = h * rstd
  LayerNorm: mu = mean(h), rstd = 1/sqrt(mean((h-mu)^2) + eps), xhat = (h - mu) * rstd
  y = xhat * w (+ b)

Backward (``dy`` upstream of y, ``dh_next`` upstream of the returned h, ``g = dy * w``):

  dw = sum_rows dy * xhat,  db = sum_rows dy
  RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
             (d xhat_j / d h_k = rstd * ([j == k] - xhat_j xhat_k / N))
  LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
             (d xhat_j / d h_k = rstd * ([j == k] - 1/N - xhat_j xhat_k / N))
  dh += dh_next;  dresidual = dh;  dx = dh * m  (the regenerated mask)

dw and db are reduced in fp32 per program (programs loop over rows) into a (P, N) buffer that
the launcher sums with torch: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..protocols import dropout_threshold
from .launch import launch
from . import tuning
from .tuning import dropout_config, dropout_norm_config, dropout_norm_programs

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op


@triton.jit
def _dropout_factor(
    seed,  # i64 Philox seed (loaded)
    counters,  # int64 [..., M]: the Philox counter of each group of 8 consecutive columns
    threshold,  # i32 drop threshold t: kept iff draw >= t
    scale,  # fp32 1 / (1 - p) (0 when p == 1)
):
    # fp32 factor [..., 8 M] of the columns the counters cover: `scale` where kept, 0 where dropped.
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # [..., 4 M]: w0 w1 w2 w3 per group
    draws = tl.interleave(words & 0xFFFF, words >> 16)  # [..., 8 M]: low half, high half of each word
    return tl.where(draws.to(tl.int32) >= threshold, scale, 0.0)


@triton.jit
def dropout_kernel(
    x_ptr,  # *T (R, N) input, contiguous (also the upstream gradient, for backward)
    bias_ptr,  # *Tb (N,) added to x before dropout, broadcast over rows (HAS_BIAS only)
    residual_ptr,  # *Tr (R, N) added after dropout (HAS_RESIDUAL only)
    out_ptr,  # *To (R, N) out: residual + (x + bias) * m; may be x itself
    seed_ptr,  # *i64 () Philox seed drawn from torch's generator
    n_rows,  # R
    n_cols,  # N, the last dimension
    n_groups,  # ceil(N / 8): Philox counters per row
    threshold,  # i32 drop threshold t (kept iff draw >= t)
    scale,  # fp32 1 / (1 - p), 0 when p == 1
    HAS_BIAS: tl.constexpr,  # bias given
    HAS_RESIDUAL: tl.constexpr,  # residual given
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile, a multiple of 8
):
    # Program (i, j) owns the tile of rows i BLOCK_R.. and columns j BLOCK_N..
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    tile_n = tl.program_id(1).to(tl.int64)  # the column tile: int64 like every offset
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    offsets = rows * n_cols + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    counters = rows * n_groups + (tile_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)[None, :])
    out = x * _dropout_factor(tl.load(seed_ptr), counters, threshold, scale)
    if HAS_RESIDUAL:
        out += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dropout_add_norm_fwd_kernel(
    x_ptr,  # *T (R, N) input of dropout, contiguous
    residual_ptr,  # *Tr (R, N) residual stream (HAS_RESIDUAL only)
    weight_ptr,  # *Tw (N,) norm weight (HAS_WEIGHT only)
    bias_ptr,  # *Tw (N,) norm bias (HAS_BIAS only: LayerNorm)
    y_ptr,  # *Th (R, N) out: norm(h) * weight + bias
    h_ptr,  # *Th (R, N) out: the new residual h = residual + dropout(x)
    mean_ptr,  # *fp32 (R,) out: mean of each row of h (LayerNorm only)
    rstd_ptr,  # *fp32 (R,) out: 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(h^2) + eps))
    seed_ptr,  # *i64 () Philox seed (HAS_DROPOUT only)
    n_cols,  # N, elements per row (at most BLOCK_N)
    n_groups,  # ceil(N / 8): Philox counters per row
    threshold,  # i32 drop threshold t (kept iff draw >= t)
    scale,  # fp32 1 / (1 - p), 0 when p == 1
    eps,  # fp32 added to the variance
    IS_RMS: tl.constexpr,  # RMSNorm (else LayerNorm)
    HAS_RESIDUAL: tl.constexpr,  # residual given (else h = dropout(x))
    HAS_WEIGHT: tl.constexpr,  # norm weight given (else 1)
    HAS_BIAS: tl.constexpr,  # norm bias given
    HAS_DROPOUT: tl.constexpr,  # p > 0 and training
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    offsets = row * n_cols + cols
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = h * _dropout_factor(tl.load(seed_ptr), row * n_groups + tl.arange(0, BLOCK_N // 8), threshold, scale)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offsets, h, mask=mask)
    h = h.to(tl.float32)  # normalise the stored value, as the composition and backward do
    if IS_RMS:
        xhat = h
    else:
        mean = tl.sum(h, 0) / n_cols
        tl.store(mean_ptr + row, mean)
        xhat = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xhat * xhat, 0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xhat * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dropout_add_norm_bwd_kernel(
    dy_ptr,  # *Th (R, N) upstream gradient of y, contiguous
    dh_next_ptr,  # *Th (R, N) upstream gradient of the returned h (HAS_DH_NEXT only)
    h_ptr,  # *Th (R, N) h saved by forward
    weight_ptr,  # *Tw (N,) norm weight (HAS_WEIGHT only)
    mean_ptr,  # *fp32 (R,) row means from forward (LayerNorm only)
    rstd_ptr,  # *fp32 (R,) row rstd from forward
    seed_ptr,  # *i64 () forward's Philox seed (HAS_DROPOUT only)
    dx_ptr,  # *T (R, N) out: gradient of x
    dresidual_ptr,  # *Tr (R, N) out: gradient of residual (HAS_RESIDUAL only)
    dweight_ptr,  # *fp32 (P, N) out: per-program partial sums of dy * xhat (HAS_WEIGHT only)
    dbias_ptr,  # *fp32 (P, N) out: per-program partial sums of dy (HAS_BIAS only)
    n_rows,  # R; program q handles rows q, q + P, ...
    n_cols,  # N, elements per row (at most BLOCK_N)
    n_groups,  # ceil(N / 8): Philox counters per row
    threshold,  # i32 drop threshold t (kept iff draw >= t)
    scale,  # fp32 1 / (1 - p), 0 when p == 1
    IS_RMS: tl.constexpr,  # RMSNorm (else LayerNorm)
    HAS_DH_NEXT: tl.constexpr,  # the returned h received a gradient
    HAS_RESIDUAL: tl.constexpr,  # write the residual's gradient
    HAS_WEIGHT: tl.constexpr,  # norm weight given: scale by it and accumulate its gradient
    HAS_BIAS: tl.constexpr,  # norm bias given: accumulate its gradient
    HAS_DROPOUT: tl.constexpr,  # p > 0 and training
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row32 in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(row32, tl.int64)
        offsets = row * n_cols + cols
        if HAS_DROPOUT:  # first, while few values are live: Philox needs registers
            factor = _dropout_factor(seed, row * n_groups + tl.arange(0, BLOCK_N // 8), threshold, scale)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if not IS_RMS:
            xhat = tl.where(mask, xhat - tl.load(mean_ptr + row), 0.0)
        xhat = xhat * rstd
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            dw += dy * xhat
            g = dy * w
        else:
            g = dy
        if HAS_BIAS:
            db += dy
        dh = g - xhat * (tl.sum(g * xhat, 0) / n_cols)
        if not IS_RMS:
            dh -= tl.sum(g, 0) / n_cols
        dh = dh * rstd
        if HAS_DH_NEXT:
            dh += tl.load(dh_next_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(dresidual_ptr + offsets, dh.to(dresidual_ptr.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dh = dh * factor
        tl.store(dx_ptr + offsets, dh.to(dx_ptr.dtype.element_ty), mask=mask)
    partial = tl.program_id(0).to(tl.int64) * n_cols + cols
    if HAS_WEIGHT:
        tl.store(dweight_ptr + partial, dw, mask=mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, db, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: the triton backend's DropoutBackend (fusedls/backend/protocols.py)
# ----------------------------------------------------------------------------------------------


def _mask_args(n_cols: int, p: float) -> tuple[int, int, float]:
    """(Philox counters per row, drop threshold, scale of the kept elements)."""
    return -(-n_cols // 8), dropout_threshold(p), 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_forward(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    seed: torch.Tensor,
    p: float,
    out: torch.Tensor,
) -> None:
    """Writes ``residual + (x + bias) * m`` into ``out`` (contiguous, x's shape: rows of its last
    dimension; bias (N,))."""
    n = x.numel()
    if n == 0:
        return
    n_cols = x.shape[-1] if x.dim() else 1
    n_rows = n // n_cols
    cfg = dropout_config(n_cols)
    launch(dropout_kernel, (triton.cdiv(n_rows, cfg.block_r), triton.cdiv(n_cols, cfg.block_c)),
        x, bias if bias is not None else x, residual if residual is not None else x, out, seed,
        n_rows, n_cols, *_mask_args(n_cols, p),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_c, **cfg.launch_options(),
    )  # fmt: skip


def dropout_add_norm_unsupported(n_cols: int, element_size: int) -> str:
    """Why rows of ``n_cols`` cannot be normalised here ("" when they can): the norm kernels keep
    a whole row in registers, up to ``tuning.DROPOUT_NORM_MAX_N`` elements."""
    longest = tuning.DROPOUT_NORM_MAX_N.get(element_size, 0)
    if n_cols <= longest:
        return ""
    return f"rows of {n_cols} elements exceed the norm kernel's {longest} for {element_size}-byte data"


def dropout_add_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    eps: float,
    is_rms: bool,
    y: torch.Tensor,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """Writes y, h (R, N) and the fp32 row statistics mean (LayerNorm only) and rstd."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    cfg = dropout_norm_config(n_cols)
    launch(dropout_add_norm_fwd_kernel, (n_rows,),
        x, residual if residual is not None else x, weight if weight is not None else x, bias if bias is not None else x,
        y, h, mean, rstd, seed if seed is not None else rstd,
        n_cols, *_mask_args(n_cols, p), eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_DROPOUT=seed is not None, BLOCK_N=cfg.block_c, **cfg.launch_options(),
    )  # fmt: skip


def dropout_add_norm_backward(
    dy: torch.Tensor,
    dh_next: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    is_rms: bool,
    dx: torch.Tensor,
    dresidual: torch.Tensor | None,
    dweight: torch.Tensor | None,
    dbias: torch.Tensor | None,
) -> None:
    """Writes dx, dresidual (if given) and the fp32 (N,) sums dweight, dbias (if given)."""
    n_rows, n_cols = h.shape
    if n_rows == 0:
        for total in (dweight, dbias):
            if total is not None:
                total.zero_()
        return
    cfg = dropout_norm_config(n_cols)
    programs = dropout_norm_programs(h.device, n_rows)
    partial_w = torch.empty(programs, n_cols, device=h.device, dtype=torch.float32) if dweight is not None else rstd
    partial_b = torch.empty(programs, n_cols, device=h.device, dtype=torch.float32) if dbias is not None else rstd
    launch(dropout_add_norm_bwd_kernel, (programs,),
        dy, dh_next if dh_next is not None else dy, h, weight if weight is not None else h, mean, rstd,
        seed if seed is not None else rstd,
        dx, dresidual if dresidual is not None else dx, partial_w, partial_b,
        n_rows, n_cols, *_mask_args(n_cols, p),
        IS_RMS=is_rms, HAS_DH_NEXT=dh_next is not None, HAS_RESIDUAL=dresidual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=dbias is not None, HAS_DROPOUT=seed is not None,
        BLOCK_N=cfg.block_c, **cfg.launch_options(),
    )  # fmt: skip
    if dweight is not None:
        torch.sum(partial_w, 0, out=dweight)
    if dbias is not None:
        torch.sum(partial_b, 0, out=dbias)
