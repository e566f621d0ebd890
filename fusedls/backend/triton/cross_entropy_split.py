"""Triton kernel of ``cross_entropy``'s split-row path: each row cut into slices of BLOCK_C
classes, one program per slice, the slices of a row exchanging their partial statistics.

A program loads its slice once and keeps it in registers, writes the slice's partials (max m_j,
sum-exp s_j relative to m_j, the linear sums, the target's logit if the slice holds it, the
slice's argmax) to a small buffer, and,
once every slice of the row has written its partials, merges them (in slice order, the same in
every program of the row: deterministic) into the row's lse and gradient coefficient and writes
its slice of the gradient from the registers. One HBM read of the logits, one write of the
gradient, and a row of any length spread over as many SMs as it has slices.

Three variants of the same math (PHASE):

  0  cooperative: partials, a device-scope handshake on the row's counter (release by each
     slice, acquire until all have arrived), merge, gradient. It needs every program of a row
     resident at once: the launcher makes the grid a multiple of the slices per row, with work
     items (row, slice) assigned round by round (item = round * programs + program), so the
     slices of a row are in the same round on different programs, and no larger than the number
     of programs the device holds at once (tuning.cross_entropy_split_programs), so no program
     waits on one that has not started.
  1  partials only;
  2  merge and gradient, reloading the slice: 1 then 2 is the serial-safe two-phase variant
     (the interpreter, which runs programs one after another, would spin forever in 0).

The merge is the module docstring's math in fusedls/backend/triton/cross_entropy_kernels.py:
lse = M + log(sum_j s_j exp(m_j - M)) with M = max_j m_j; the linear sums add up.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .cross_entropy_kernels import (
    _cross_entropy_grad_chunk, _cross_entropy_row_loss, _cross_entropy_row_target, _cross_entropy_stats_chunk,
    _cross_entropy_store_row,
)  # fmt: skip

N_PARTIALS = 5  # fp32 partials of a slice: m, s, sum_wx, sum_w, x_y (the target's logit where the slice holds it, else 0)
_N_PARTIALS = tl.constexpr(N_PARTIALS)


@triton.jit
def cross_entropy_split_kernel(
    # the rows, their outputs and the options: as cross_entropy_fwd_kernel (cross_entropy_kernels.py)
    logits_ptr, stride_logits, target_ptr, stride_target, weight_ptr, loss_ptr, lse_ptr, coef_ptr, grad_ptr,
    stride_grad, grad_scale_ptr, argmax_ptr,
    partials_ptr,  # *fp32 (R, n_splits, N_PARTIALS) scratch: each slice's m, s, sum_wx, sum_w, x_y
    partial_args_ptr,  # *int32 (R, n_splits) scratch: each slice's argmax (ARGMAX only)
    count_ptr,  # *int32 (R,) slices of each row whose partials are written, zero at launch (PHASE 0)
    n_rows,  # R
    n_cols,  # C
    n_splits,  # slices per row: cdiv(C, BLOCK_C)
    ignore_index, keep, spread, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ARGMAX: tl.constexpr,
    PHASE: tl.constexpr,  # 0 cooperative, 1 partials only, 2 merge and gradient (module docstring)
    MAX_SPLITS: tl.constexpr,  # a power of two >= n_splits (the merge's vector)
    BLOCK_C: tl.constexpr,  # classes per slice
):  # fmt: skip
    # Work items (row, slice), item = round * programs + program (see the module docstring).
    for item32 in range(tl.program_id(0), n_rows * n_splits, tl.num_programs(0)):
        item = tl.cast(item32, tl.int64)
        row = item // n_splits
        part = item % n_splits
        start = part * BLOCK_C
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        logits_row = logits_ptr + row * stride_logits
        target_row = target_ptr + row * stride_target
        grad_row = grad_ptr + row * stride_grad
        y, ignored, bad, target_term = _cross_entropy_row_target(
            target_ptr, stride_target, row, weight_ptr, n_cols, ignore_index, keep, HAS_WEIGHT, PROB_TARGET
        )
        mine = partials_ptr + item * _N_PARTIALS  # this slice's partials
        if ignored:  # every slice knows: no exchange
            if PHASE != 1:
                if part == 0:
                    _cross_entropy_store_row(loss_ptr, lse_ptr, coef_ptr, argmax_ptr, row, 0.0, 0.0, 0.0, -1, ARGMAX)
                if WRITE_GRAD:
                    tl.store(grad_row + cols, tl.zeros([BLOCK_C], dtype=grad_ptr.dtype.element_ty), mask=mask)
        else:
            raw = tl.load(logits_row + cols, mask=mask, other=float("-inf"))  # kept for the gradient
            if PHASE != 2:
                x, m, s, arg, sum_wx, sum_w = _cross_entropy_stats_chunk(
                    raw.to(tl.float32), start, cols, mask, target_row, weight_ptr, float("-inf"), 0.0, 0, 0.0, 0.0,
                    keep, spread, softcap, HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, HAS_SOFTCAP, ARGMAX,
                )  # fmt: skip
                tl.store(mine, m)
                tl.store(mine + 1, s)
                tl.store(mine + 2, sum_wx)
                tl.store(mine + 3, sum_w)
                # The target's (capped) logit, from the registers of the slice that holds it: read
                # here, before any slice of the row can write its gradient over the logits in place.
                x_y = 0.0
                if not PROB_TARGET:
                    x_y = tl.sum(tl.where(cols == y, x, 0.0), 0)
                tl.store(mine + 4, x_y)
                if ARGMAX:
                    tl.store(partial_args_ptr + item, arg.to(tl.int32))
            if PHASE == 0:
                # Release this slice's partials, then acquire the others': the counter reaches
                # n_splits once every slice of the row has written its own.
                tl.debug_barrier()
                arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu") + 1
                while arrived < n_splits:
                    arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire", scope="gpu")
            if PHASE != 1:
                # Merge the row's partials in slice order.
                j = tl.arange(0, MAX_SPLITS)
                jm = j < n_splits
                theirs = partials_ptr + (row * n_splits + j) * _N_PARTIALS
                # .cg: from L2, never from a line this SM's L1 took before the other slices wrote
                m_j = tl.load(theirs, mask=jm, other=float("-inf"), cache_modifier=".cg")
                s_j = tl.load(theirs + 1, mask=jm, other=0.0, cache_modifier=".cg")
                m = tl.max(m_j, 0)
                m_ref = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf: exp() gives 0, not NaN
                lse = m + tl.log(tl.sum(s_j * tl.exp(m_j - m_ref), 0))
                sum_wx = tl.sum(tl.load(theirs + 2, mask=jm, other=0.0, cache_modifier=".cg"), 0)
                sum_w = tl.sum(tl.load(theirs + 3, mask=jm, other=0.0, cache_modifier=".cg"), 0)
                # the target's logit (class ids): from the one slice that holds it, the others add 0
                x_y = tl.sum(tl.load(theirs + 4, mask=jm, other=0.0, cache_modifier=".cg"), 0)
                loss, coef = _cross_entropy_row_loss(
                    lse, x_y, sum_wx, sum_w, target_term, spread, z_loss, n_cols,
                    HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, HAS_Z_LOSS,
                )  # fmt: skip
                poison = tl.where(bad, float("nan"), 0.0)
                if part == 0:
                    row_arg = 0
                    if ARGMAX:  # the first slice holding the maximum, and its first maximum
                        _, first = tl.max(m_j, 0, return_indices=True, return_indices_tie_break_left=True)
                        arg_j = tl.load(partial_args_ptr + row * n_splits + j, mask=jm, other=0, cache_modifier=".cg")
                        row_arg = tl.sum(tl.where(j == first, arg_j, 0), 0)
                    _cross_entropy_store_row(loss_ptr, lse_ptr, coef_ptr, argmax_ptr, row, loss + poison, lse, coef,
                                             row_arg, ARGMAX)  # fmt: skip
                if WRITE_GRAD:
                    _cross_entropy_grad_chunk(
                        tl.where(mask, raw, 0.0).to(tl.float32), cols, mask, target_row, weight_ptr, grad_row,
                        grad_row, y, lse, coef, target_term, keep, spread, tl.load(grad_scale_ptr) + poison, softcap,
                        HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, False, HAS_SOFTCAP,
                    )  # fmt: skip
