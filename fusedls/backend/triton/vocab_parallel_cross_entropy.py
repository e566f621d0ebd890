"""Triton kernels of the vocabulary-parallel cross-entropy's local math (``fusedls/ops/vocab_parallel_cross_entropy.py``).

Same interface and formulas as ``fusedls/backend/eager/vocab_parallel_cross_entropy.py`` (its module
docstring has the derivation); one program owns one row of this rank's ``(R, C_local)`` logits
and sweeps it in chunks of ``BLOCK_C`` classes:

* ``vocab_parallel_stats_kernel``: one read of the row; online max / sum-exp of the (capped)
  logits in fp32, the target logit where this rank owns the target, and ``sum_c w_c z_c`` for
  label smoothing: the local parts of what the collectives combine;
* ``vocab_parallel_grad_kernel``: one read of the row and one write of its gradient, formed in
  fp32 from the global ``lse`` and ``coef`` and rounded once:
  ``g_c = scale * (coef * p_c - spread * w_c - [c = y] * target_coef) * (1 - (z_c / s)**2)``.

Soft cap: ``z = s * tanh(x / s)`` with the cross-entropy kernels' ``_tanh`` (accurate near 0, where
``2 sigmoid(2u) - 1`` cancels), so the capped logits are bit for bit those of the cross-entropy
forward: ``linear_cross_entropy(strategy="vocab")`` takes its lse from that forward and its
gradient from these kernels (one class: p = 1 exactly, a zero gradient). Probability targets run
on the eager backend (``UNSUPPORTED``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..eager.vocab_parallel_cross_entropy import init_statistics
from ..protocols import N_STATS, TARGET_LOGIT, WEIGHTED_SUM
from .launch import launch
from . import tuning
from .cross_entropy_kernels import _sech2, _tanh
from .tuning import vocab_parallel_config

UNSUPPORTED = frozenset({"prob_target"})

# Layout of the (R, N_STATS) statistics, as the kernels see it.
_N_STATS = tl.constexpr(N_STATS)
_TARGET_LOGIT = tl.constexpr(TARGET_LOGIT)
_WEIGHTED_SUM = tl.constexpr(WEIGHTED_SUM)


@triton.jit
def _capped(
    x,  # fp32 block of logits
    softcap,  # fp32 cap s (HAS_SOFTCAP only)
    HAS_SOFTCAP: tl.constexpr,  # apply s * tanh(x / s)
):
    if HAS_SOFTCAP:
        return softcap * _tanh(x / softcap)
    return x


@triton.jit
def vocab_parallel_stats_kernel(
    logits_ptr,  # *T (R, C_local) local logits; rows `stride_logits` elements apart, classes contiguous
    stride_logits,  # elements between consecutive rows of the logits
    target_ptr,  # *int64 (R,) local column of the target, -1 where this rank does not own it
    weight_ptr,  # *fp32 (C_local,) local class weights, read only when HAS_WEIGHT
    lse_ptr,  # *fp32 (R,) out: log-sum-exp of the row's local (capped) logits
    stats_ptr,  # *fp32 (R, N_STATS) out: columns TARGET_LOGIT and WEIGHTED_SUM (others untouched)
    n_cols,  # C_local, >= 1
    softcap,  # fp32 cap s (HAS_SOFTCAP only)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0: sum_c w_c z_c is needed
    HAS_SOFTCAP: tl.constexpr,  # logits soft-capped
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    m = float("-inf")
    s = 0.0
    sum_wz = 0.0
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        # A row (so far) of -inf: shift by 0 instead of -inf so exp() gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), 0)
        m = m_new
        if HAS_SMOOTHING:
            z0 = tl.where(mask, z, 0.0)
            if HAS_WEIGHT:
                z0 = z0 * tl.load(weight_ptr + cols, mask=mask, other=0.0)
            sum_wz += tl.sum(z0, 0)
    tl.store(lse_ptr + row, m + tl.log(s))
    y = tl.load(target_ptr + row)
    if y >= 0:
        x_y = tl.load(logits_row + y).to(tl.float32)
        tl.store(stats_ptr + row * _N_STATS + _TARGET_LOGIT, _capped(x_y, softcap, HAS_SOFTCAP))
    if HAS_SMOOTHING:
        tl.store(stats_ptr + row * _N_STATS + _WEIGHTED_SUM, sum_wz)


@triton.jit
def vocab_parallel_grad_kernel(
    logits_ptr,  # *T (R, C_local) local logits
    stride_logits,  # elements between consecutive rows of the logits
    target_ptr,  # *int64 (R,) local column of the target, -1 where this rank does not own it
    weight_ptr,  # *fp32 (C_local,) local class weights, read only when HAS_WEIGHT
    lse_ptr,  # *fp32 (R,) global log-sum-exp of each row
    coef_ptr,  # *fp32 (R,) factor of p_c: keep * w_y + spread * W + 2 * lam * lse
    target_coef_ptr,  # *fp32 (R,) keep * w_y, subtracted at the target's column
    scale_ptr,  # *fp32 (R,) factor of each row's gradient (0 ignored, NaN bad target)
    grad_ptr,  # *T' (R, C_local) out: scale * dl/dlogits
    stride_grad,  # elements between consecutive rows of grad
    n_cols,  # C_local, >= 1
    spread,  # eps / C, C global
    softcap,  # fp32 cap s (HAS_SOFTCAP only)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0
    HAS_SOFTCAP: tl.constexpr,  # logits soft-capped
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    y = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    target_coef = tl.load(target_coef_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        z = _capped(x, softcap, HAS_SOFTCAP)
        # dl/dz_c = coef * p_c - spread * w_c - [c = y] * keep * w_y
        g = coef * tl.exp(z - lse)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g = g - spread * tl.load(weight_ptr + cols, mask=mask, other=0.0)
            else:
                g = g - spread
        g = tl.where(cols == y, g - target_coef, g)
        if HAS_SOFTCAP:  # dz/dx = 1 - tanh(x / s)**2, without cancellation
            g = g * _sech2(x / softcap)
        tl.store(grad_row + cols, (g * scale).to(grad_row.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: the triton backend's implementation of fusedls/backend/eager/vocab_parallel_cross_entropy.py
# ----------------------------------------------------------------------------------------------


def row_chunks(n_rows: int, n_cols: int):
    """Slices of rows launched together (about ``tuning.VOCAB_PARALLEL_CHUNK_ELEMENTS`` logits)."""
    step = max(1, tuning.VOCAB_PARALLEL_CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _flags(weight, spread: float, softcap: float | None) -> dict:
    return dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=spread != 0.0, HAS_SOFTCAP=softcap is not None)


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def local_statistics(logits_of, n_rows, n_cols, y_local, owned, probs, weight, keep, spread, softcap, acc):
    """See :func:`fusedls.backend.eager.vocab_parallel_cross_entropy.local_statistics` (class ids only)."""
    lse_local, stats = init_statistics(n_rows, n_cols, y_local, owned, probs, weight, acc)
    if n_cols == 0 or n_rows == 0:
        return lse_local, stats
    target = torch.where(owned, y_local, -1)
    for rows in row_chunks(n_rows, n_cols):
        x = _rows_2d(logits_of(rows))
        cfg = vocab_parallel_config(n_cols, x.element_size())
        launch(vocab_parallel_stats_kernel, (x.shape[0],),
            x, x.stride(0),
            target[rows], weight if weight is not None else lse_local,
            lse_local[rows], stats[rows],
            n_cols, softcap or 1.0,
            BLOCK_C=cfg.block_c, **cfg.launch_options(), **_flags(weight, spread, softcap),
        )  # fmt: skip
    return lse_local, stats


def local_grad(x, lse, coef, target, target_coef, weight, keep, spread, softcap, scale, acc, target_grad=False, out=None):
    """See :func:`fusedls.backend.eager.vocab_parallel_cross_entropy.local_grad` (class ids only): the
    gradient is written straight into ``out`` when given (one rounding), else returned in ``acc``."""
    x = _rows_2d(x)
    n_rows, n_cols = x.shape
    grad = out if out is not None else torch.empty(x.shape, dtype=acc, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return grad, None
    cfg = vocab_parallel_config(n_cols, x.element_size())
    launch(vocab_parallel_grad_kernel, (n_rows,),
        x, x.stride(0),
        target.contiguous(), weight if weight is not None else lse,
        *(v.contiguous() for v in (lse, coef, target_coef, scale)),
        grad, grad.stride(0),
        n_cols, spread, softcap or 1.0,
        BLOCK_C=cfg.block_c, **cfg.launch_options(), **_flags(weight, spread, softcap),
    )  # fmt: skip
    return grad, None
