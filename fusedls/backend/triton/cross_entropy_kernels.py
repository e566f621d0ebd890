"""Triton kernels of ``cross_entropy`` (launched by cross_entropy.py): forward (optionally with
the gradient), backward, and
the in-place rescale of a gradient computed during forward.

One program owns one row of the (R, C) logits and sweeps its classes in chunks of BLOCK_C:

* sweep 1 reads the row from HBM: online max / sum-exp in fp32 (so any C works, powers of two
  or not), plus the sums the smoothing term and probability targets need;
* sweep 2 (forward with WRITE_GRAD, or backward) re-reads the row, which the same program has
  just touched, so it comes from L2, and writes the gradient, formed in fp32 and rounded once.

Forward + backward therefore costs one HBM read of the logits and one write of the gradient.
A row short enough for registers (RESIDENT, ``tuning.cross_entropy_resident_config``) is one
chunk, loaded once: the gradient is formed from the registers, with no second read at all.

Gradient of one row (the derivation the code follows; ``p = softmax(x)``, ``lse = log sum exp x``,
``eps`` = label smoothing, ``keep = 1 - eps``, ``spread = eps / C``, ``w`` class weights, all 1
without ``weight``, ``W = sum_c w_c``):

  class ids:     l = keep * w_y * (lse - x_y) + spread * (W * lse - sum_c w_c x_c)
                 dl/dx_c = coef * p_c - keep * w_y * [c == y] - spread * w_c,
                 coef = keep * w_y + spread * W            (d lse / dx_c = p_c)
  probabilities: t'_c = keep * t_c + spread,  l = sum_c w_c t'_c (lse - x_c)
                 dl/dx_c = coef * p_c - w_c t'_c,  coef = sum_c w_c t'_c
                 dl/dt_c = keep * w_c * (lse - x_c)

Options (constexpr flags, off by default):

  HAS_SOFTCAP (Gemma 2): every logit is first capped, x <- s * tanh(r / s) for the raw logit r,
                 and everything above applies to the capped x; by the chain rule
                 dl/dr_c = dl/dx_c * (1 - tanh^2(r_c / s)), formed in the same fp32 expression.
  HAS_Z_LOSS (PaLM): l += z * lse^2 on every row that is not ignored; d(z lse^2)/dx_c = 2 z lse p_c,
                 so the z-loss only adds 2 z lse to ``coef`` (stored: backward needs no flag for it).

Each row's gradient is multiplied by the upstream factor of that row (1/D for mean, where D is
torch's weighted denominator). A row whose class id is outside [0, C) and is not ignore_index
gets NaN loss and NaN gradient (it never reads outside the row): that is how out-of-range
targets surface on GPU without a host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # tanh in fp32 without libdevice (which the interpreter lacks), by odd symmetry on a = |u|:
    # cephes' tanhf polynomial near 0, where 1 - 2 / (e^2a + 1) would cancel, and that closed
    # form (exact limit 1 at inf) elsewhere; both within a few ulp of tanh. Evaluated at -a the
    # closed form would round 1 + e^-2a to 1 and return exactly -1 from a ~ 8.3 on.
    a = tl.abs(u)
    z = a * a
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
            - 3.33332819422e-1) * z * a + a  # fmt: skip
    t = tl.where(a < 0.625, poly, 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _sech2(u):
    # d tanh(u) / du = 1 - tanh(u)^2 = 4 e / (1 + e)^2 with e = exp(-2 |u|): a few ulp everywhere,
    # where 1 - tanh^2 from a rounded tanh loses every digit as tanh nears +-1 (|u| > 8: 0 instead
    # of ~1e-7).
    e = tl.exp(-2.0 * tl.abs(u))
    d = 1.0 + e
    return 4.0 * e / (d * d)


@triton.jit
def _cross_entropy_grad_chunk(
    x,  # fp32 raw logits of the chunk (before any cap); lanes outside the row hold any finite value
    cols,  # the chunk's column indices
    mask,  # cols < C
    target_row,  # pointer to the row's first target probability (PROB_TARGET only)
    weight_ptr,  # *fp32 (C,) class weights (HAS_WEIGHT only)
    grad_row,  # pointer to the row's first gradient element (out)
    grad_target_row,  # pointer to the row's first target-gradient element (TARGET_GRAD only, out)
    y,  # the row's class id (class-id targets)
    lse,  # fp32 log-sum-exp of the row
    coef,  # fp32 coefficient of p_c in the gradient (see the module docstring)
    target_term,  # fp32 keep * w_y, subtracted at c == y (class-id targets)
    keep,  # 1 - eps
    spread,  # eps / C
    scale,  # fp32 factor of this row's gradient (upstream gradient, 1/D, or NaN to poison)
    softcap,  # s of the logit cap s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0
    PROB_TARGET: tl.constexpr,  # targets are probabilities, not class ids
    TARGET_GRAD: tl.constexpr,  # also write dl/dt (probability targets that require grad)
    HAS_SOFTCAP: tl.constexpr,  # cap the logits (see the module docstring)
):
    # Writes the gradient of one chunk of a row from its logits x (see the module docstring).
    if HAS_SOFTCAP:
        u = x / softcap
        x = softcap * _tanh(u)
    g = coef * tl.exp(x - lse)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if PROB_TARGET:
        t = keep * tl.load(target_row + cols, mask=mask, other=0.0).to(tl.float32) + spread
        if HAS_WEIGHT:
            t = t * w
        g = g - t
        if TARGET_GRAD:
            dt = lse - x
            if HAS_WEIGHT:
                dt = dt * w
            dt = dt * (keep * scale)
            tl.store(grad_target_row + cols, dt.to(grad_target_row.dtype.element_ty), mask=mask)
    else:
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g = g - spread * w
            else:
                g = g - spread
        g = tl.where(cols == y, g - target_term, g)
    if HAS_SOFTCAP:
        g = g * _sech2(u)  # chain rule through the cap
    tl.store(grad_row + cols, (g * scale).to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_grad_sweep(
    logits_row,  # pointer to the row's first logit
    target_row, weight_ptr, grad_row, grad_target_row,
    n_cols,  # C
    y, lse, coef, target_term, keep, spread, scale, softcap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr, TARGET_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_C: tl.constexpr,  # classes per chunk
):  # fmt: skip
    # The gradient of a row, chunk by chunk; the other arguments are _cross_entropy_grad_chunk's.
    # Last chunk first: right after sweep 1 the end of the row is the likeliest still in L2
    # (least recently used goes first), so a row too long for its share of L2 loses its head,
    # not all of it.
    last = tl.cdiv(n_cols, BLOCK_C) - 1
    for i in range(0, last + 1):
        cols = (last - i) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        _cross_entropy_grad_chunk(
            x, cols, mask, target_row, weight_ptr, grad_row, grad_target_row, y, lse, coef, target_term, keep,
            spread, scale, softcap, HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, TARGET_GRAD, HAS_SOFTCAP,
        )  # fmt: skip


@triton.jit
def _cross_entropy_zero_row(
    grad_row,  # pointer to the row's first gradient element (out)
    n_cols,  # C
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    # Ignored rows have a zero gradient (written, since the buffer comes from torch.empty).
    zeros = tl.zeros([BLOCK_C], dtype=grad_row.dtype.element_ty)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        tl.store(grad_row + cols, zeros, mask=cols < n_cols)


@triton.jit
def _cross_entropy_stats_chunk(
    raw,  # fp32 logits of the chunk as loaded, -inf outside the row
    start,  # the chunk's first column
    cols,  # the chunk's column indices (start + arange)
    mask,  # cols < C
    target_row,  # pointer to the row's first target probability (PROB_TARGET only)
    weight_ptr,  # *fp32 (C,) class weights (HAS_WEIGHT only)
    m,  # fp32 running maximum of the row's logits (after the cap)
    s,  # fp32 running sum of exp(x - m)
    arg,  # running argmax (ARGMAX only)
    sum_wx,  # fp32 running linear sum (class ids: sum w_c x_c; probabilities: sum w_c t'_c x_c)
    sum_w,  # fp32 running weight sum (class ids with weights: sum w_c; probabilities: sum w_c t'_c)
    keep,  # 1 - eps
    spread,  # eps / C
    softcap,  # s of the logit cap s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0 (class ids: needs sum_c w_c x_c)
    PROB_TARGET: tl.constexpr,  # targets are probabilities, not class ids
    HAS_SOFTCAP: tl.constexpr,  # cap the logits before everything
    ARGMAX: tl.constexpr,  # track the row's argmax
):
    # One chunk of sweep 1: returns the chunk's (capped) logits and the updated running values.
    x = raw
    if HAS_SOFTCAP:  # the cap maps the padding's -inf to -s: put it back
        x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 0))
    if ARGMAX:  # the chunk's first maximum replaces the row's only if strictly larger
        chunk_max, chunk_arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        arg = tl.where(chunk_max > m, start + chunk_arg, arg)
    # A row (so far) of -inf: shift by 0 instead of -inf so exp() gives 0, not NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
    if PROB_TARGET:
        t = keep * tl.load(target_row + cols, mask=mask, other=0.0).to(tl.float32) + spread
        if HAS_WEIGHT:
            t = t * tl.load(weight_ptr + cols, mask=mask, other=0.0)
        t = tl.where(mask, t, 0.0)
        sum_w += tl.sum(t, 0)
        # t * x with the padding lanes' x (-inf) zeroed first; a real -inf logit with
        # t = 0 still gives NaN, as torch's -(t * log_softmax(x)).sum() does.
        sum_wx += tl.sum(t * tl.where(mask, x, 0.0), 0)
    elif HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
            sum_w += tl.sum(w, 0)
            sum_wx += tl.sum(w * tl.where(mask, x, 0.0), 0)
        else:
            sum_wx += tl.sum(tl.where(mask, x, 0.0), 0)
    return x, m_new, s, arg, sum_wx, sum_w


@triton.jit
def _cross_entropy_target_logit(
    logits_row,  # pointer to the row's first logit
    y,  # the row's class id (within the row)
    softcap,  # s of the logit cap s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_SOFTCAP: tl.constexpr,  # cap the logits
):
    # x_y in fp32, capped like every logit.
    x_y = tl.load(logits_row + y).to(tl.float32)
    if HAS_SOFTCAP:
        x_y = softcap * _tanh(x_y / softcap)
    return x_y


@triton.jit
def _cross_entropy_row_loss(
    lse,  # fp32 log-sum-exp of the row
    x_y,  # fp32 (capped) logit of the target class (class ids)
    sum_wx,  # fp32 class ids: sum_c w_c x_c (HAS_SMOOTHING); probabilities: sum_c w_c t'_c x_c
    sum_w,  # fp32 class ids: W = sum_c w_c (HAS_WEIGHT and HAS_SMOOTHING); probabilities: sum_c w_c t'_c
    target_term,  # fp32 keep * w_y (class ids)
    spread,  # eps / C
    z_loss,  # z of the z-loss z * lse^2 (HAS_Z_LOSS only)
    n_cols,  # C
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0
    PROB_TARGET: tl.constexpr,  # targets are probabilities, not class ids
    HAS_Z_LOSS: tl.constexpr,  # add z * lse^2
):
    # The row's loss and the coefficient of p_c in its gradient (the module docstring's formulas).
    if PROB_TARGET:
        loss = sum_w * lse - sum_wx
        coef = sum_w
    else:
        loss = target_term * (lse - x_y)
        coef = target_term
        if HAS_SMOOTHING:
            if not HAS_WEIGHT:
                sum_w = tl.cast(n_cols, tl.float32)  # n_cols == 1 arrives as a constexpr
            loss += spread * (sum_w * lse - sum_wx)
            coef += spread * sum_w
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
        coef += 2.0 * z_loss * lse
    return loss, coef


@triton.jit
def _cross_entropy_store_row(
    loss_ptr, lse_ptr, coef_ptr, argmax_ptr,  # the forward kernels' per-row outputs
    row,  # int64 row index
    loss, lse, coef,  # fp32 values of the row
    arg,  # the row's argmax (ARGMAX only)
    ARGMAX: tl.constexpr,  # argmax_ptr is an output
):
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(coef_ptr + row, coef)
    if ARGMAX:
        tl.store(argmax_ptr + row, tl.cast(arg, tl.int64))


@triton.jit
def _cross_entropy_row_target(
    target_ptr,  # *int (R,) class ids
    stride_target,  # elements between consecutive class ids
    row,  # int64 row index
    weight_ptr,  # *fp32 (C,) class weights (HAS_WEIGHT only)
    n_cols,  # C
    ignore_index,  # class id whose rows are skipped
    keep,  # 1 - eps
    HAS_WEIGHT: tl.constexpr,  # class weights given
    PROB_TARGET: tl.constexpr,  # targets are probabilities: none of this applies
):
    # Per-row constants of a class-id target: y (clamped into the row so no load leaves it),
    # whether the row is ignored, whether y is out of range, and keep * w_y.
    if PROB_TARGET:  # same types as the class-id return below, as the compiler requires
        zero = tl.full((), 0, tl.int64)
        return zero, zero != 0, zero != 0, keep * 0.0
    y = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= n_cols)) & (y != ignore_index)
    y = tl.where(bad | ignored, 0, y)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y)
    else:
        w_y = 1.0
    return y, ignored, bad, keep * w_y


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,  # *T (R, C) logits; rows `stride_logits` elements apart, classes contiguous
    stride_logits,  # elements between consecutive rows of the logits
    target_ptr,  # *int (R,) class ids, or *T' (R, C) probabilities when PROB_TARGET
    stride_target,  # elements between class ids, or between rows of probability targets
    weight_ptr,  # *fp32 (C,) class weights, read only when HAS_WEIGHT
    loss_ptr,  # *fp32 (R,) out: loss of each row, 0 for ignored rows, NaN for bad targets
    lse_ptr,  # *fp32 (R,) out: log-sum-exp of each row (0 for ignored rows)
    coef_ptr,  # *fp32 (R,) out: coefficient of p_c in the row's gradient (for backward)
    grad_ptr,  # *T (R, C) out when WRITE_GRAD: dl/dlogits times grad_scale; may alias logits
    stride_grad,  # elements between rows of grad
    grad_scale_ptr,  # *fp32 () factor of every gradient row: 1/D for mean, 1 otherwise
    argmax_ptr,  # *int64 (R,) out when ARGMAX: each row's argmax (first of tied maxima), -1 if ignored
    n_rows,  # R, the number of rows; program p handles rows p, p + P, ... (P programs)
    n_cols,  # C, the number of classes
    ignore_index,  # class id whose rows give no loss and no gradient
    keep,  # 1 - eps: the mass on the target class (class ids) or on t (probabilities)
    spread,  # eps / C: the mass spread on every class
    z_loss,  # z of the z-loss z * lse^2 (HAS_Z_LOSS only)
    softcap,  # s of the logit cap s * tanh(x / s) (HAS_SOFTCAP only)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0 (class ids: needs sum_c w_c x_c)
    PROB_TARGET: tl.constexpr,  # targets are probabilities, not class ids
    WRITE_GRAD: tl.constexpr,  # sweep the row a second time to write the gradient
    HAS_Z_LOSS: tl.constexpr,  # add z * lse^2 to every row not ignored
    HAS_SOFTCAP: tl.constexpr,  # cap the logits before everything
    ARGMAX: tl.constexpr,  # also find each row's argmax in sweep 1 (class ids; token accuracy)
    RESIDENT: tl.constexpr,  # BLOCK_C >= C: the row is read once and kept in registers
    BLOCK_C: tl.constexpr,  # classes per chunk (the whole row, padded, when RESIDENT)
):
    # With WRITE_GRAD the launcher caps the programs so the rows in flight fit in L2 (see
    # tuning.cross_entropy_programs); otherwise there is one program per row.
    for row32 in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        _cross_entropy_fwd_row(
            tl.cast(row32, tl.int64), logits_ptr, stride_logits, target_ptr, stride_target, weight_ptr,
            loss_ptr, lse_ptr, coef_ptr, grad_ptr, stride_grad, grad_scale_ptr, argmax_ptr, n_cols,
            ignore_index, keep, spread, z_loss, softcap,
            HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, WRITE_GRAD, HAS_Z_LOSS, HAS_SOFTCAP, ARGMAX, RESIDENT, BLOCK_C,
        )  # fmt: skip


@triton.jit
def _cross_entropy_fwd_row(
    row,  # int64 index of the row
    logits_ptr, stride_logits, target_ptr, stride_target, weight_ptr, loss_ptr, lse_ptr,
    coef_ptr, grad_ptr, stride_grad, grad_scale_ptr, argmax_ptr, n_cols, ignore_index, keep, spread, z_loss,
    softcap, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PROB_TARGET: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ARGMAX: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One row of cross_entropy_fwd_kernel, whose docstring lists the arguments.
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    target_row = target_ptr + row * stride_target
    y, ignored, bad, target_term = _cross_entropy_row_target(
        target_ptr, stride_target, row, weight_ptr, n_cols, ignore_index, keep, HAS_WEIGHT, PROB_TARGET
    )
    if ignored:
        _cross_entropy_store_row(loss_ptr, lse_ptr, coef_ptr, argmax_ptr, row, 0.0, 0.0, 0.0, -1, ARGMAX)
        if WRITE_GRAD:
            _cross_entropy_zero_row(grad_row, n_cols, BLOCK_C)
    else:
        # Sweep 1: online max m and sum-exp s (relative to m), and the linear sums.
        m = float("-inf")
        s = 0.0
        arg = 0  # ARGMAX: the column of m, the first of tied maxima (torch.argmax's rule)
        sum_wx = 0.0  # class ids: sum_c w_c x_c; probabilities: sum_c w_c t'_c x_c
        sum_w = 0.0  # class ids: W = sum_c w_c; probabilities: sum_c w_c t'_c
        if RESIDENT:  # the whole row in one chunk, kept in registers for the gradient
            cols = tl.arange(0, BLOCK_C)
            mask = cols < n_cols
            # kept in the logits' dtype (half the registers of fp32 for 16-bit logits), widened at each use
            raw = tl.load(logits_row + cols, mask=mask, other=float("-inf"))
            x, m, s, arg, sum_wx, sum_w = _cross_entropy_stats_chunk(
                raw.to(tl.float32), 0, cols, mask, target_row, weight_ptr, m, s, arg, sum_wx, sum_w, keep, spread,
                softcap,
                HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, HAS_SOFTCAP, ARGMAX,
            )  # fmt: skip
        else:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                mask = cols < n_cols
                raw = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                x, m, s, arg, sum_wx, sum_w = _cross_entropy_stats_chunk(
                    raw, start, cols, mask, target_row, weight_ptr, m, s, arg, sum_wx, sum_w, keep, spread, softcap,
                    HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, HAS_SOFTCAP, ARGMAX,
                )  # fmt: skip
        lse = m + tl.log(s)
        x_y = 0.0  # the target's logit (class ids)
        if not PROB_TARGET:
            if RESIDENT:  # from the registers: no load of the logits but the row's one
                x_y = tl.sum(tl.where(cols == y, x, 0.0), 0)
            else:
                x_y = _cross_entropy_target_logit(logits_row, y, softcap, HAS_SOFTCAP)
        loss, coef = _cross_entropy_row_loss(
            lse, x_y, sum_wx, sum_w, target_term, spread, z_loss, n_cols,
            HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, HAS_Z_LOSS,
        )  # fmt: skip
        poison = tl.where(bad, float("nan"), 0.0)
        _cross_entropy_store_row(loss_ptr, lse_ptr, coef_ptr, argmax_ptr, row, loss + poison, lse, coef, arg, ARGMAX)
        if WRITE_GRAD:
            scale = tl.load(grad_scale_ptr) + poison
            if RESIDENT:  # the gradient from the registers
                _cross_entropy_grad_chunk(
                    tl.where(mask, raw, 0.0).to(tl.float32), cols, mask, target_row, weight_ptr, grad_row, grad_row,
                    y, lse, coef, target_term, keep, spread, scale, softcap,
                    HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, False, HAS_SOFTCAP,
                )  # fmt: skip
            else:  # sweep 2: the row is still in L2
                _cross_entropy_grad_sweep(
                    logits_row, target_row, weight_ptr, grad_row, grad_row, n_cols, y, lse, coef,
                    target_term, keep, spread, scale, softcap,
                    HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, False, HAS_SOFTCAP, BLOCK_C,
                )  # fmt: skip


@triton.jit
def cross_entropy_bwd_kernel(
    grad_loss_ptr,  # *fp32 upstream factor of each row's gradient
    stride_grad_loss,  # elements between rows' factors: 0 broadcasts one factor (mean/sum)
    logits_ptr,  # *T (R, C) logits saved by forward
    stride_logits,  # elements between consecutive rows of the logits
    target_ptr,  # *int (R,) class ids, or *T' (R, C) probabilities when PROB_TARGET
    stride_target,  # elements between class ids, or between rows of probability targets
    weight_ptr,  # *fp32 (C,) class weights, read only when HAS_WEIGHT
    lse_ptr,  # *fp32 (R,) log-sum-exp of each row, from forward
    coef_ptr,  # *fp32 (R,) coefficient of p_c of each row, from forward
    grad_ptr,  # *T (R, C) out: dL/dlogits
    stride_grad,  # elements between rows of grad
    grad_target_ptr,  # *T' (R, C) out when TARGET_GRAD: dL/dtarget
    stride_grad_target,  # elements between rows of grad_target
    n_cols,  # C, the number of classes
    ignore_index,  # class id whose rows get a zero gradient
    keep,  # 1 - eps
    spread,  # eps / C
    softcap,  # s of the logit cap s * tanh(x / s) (HAS_SOFTCAP only; a z-loss is already in coef)
    HAS_WEIGHT: tl.constexpr,  # class weights given
    HAS_SMOOTHING: tl.constexpr,  # eps > 0
    PROB_TARGET: tl.constexpr,  # targets are probabilities, not class ids
    TARGET_GRAD: tl.constexpr,  # also write dL/dtarget
    HAS_SOFTCAP: tl.constexpr,  # the logits were capped in forward
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * stride_grad
    y, ignored, bad, target_term = _cross_entropy_row_target(
        target_ptr, stride_target, row, weight_ptr, n_cols, ignore_index, keep, HAS_WEIGHT, PROB_TARGET
    )
    if ignored:
        _cross_entropy_zero_row(grad_row, n_cols, BLOCK_C)
    else:
        scale = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        scale += tl.where(bad, float("nan"), 0.0)
        _cross_entropy_grad_sweep(
            logits_ptr + row * stride_logits, target_ptr + row * stride_target, weight_ptr,
            grad_row, grad_target_ptr + row * stride_grad_target, n_cols, y,
            tl.load(lse_ptr + row), tl.load(coef_ptr + row), target_term, keep, spread, scale, softcap,
            HAS_WEIGHT, HAS_SMOOTHING, PROB_TARGET, TARGET_GRAD, HAS_SOFTCAP, BLOCK_C,
        )  # fmt: skip


@triton.jit
def cross_entropy_scale_grad_kernel(
    grad_ptr,  # *T (R, C) gradient written by forward, rescaled in place
    stride_grad,  # elements between rows of grad
    factor_ptr,  # *fp32 upstream gradient of each row
    stride_factor,  # elements between rows' factors: 0 broadcasts one factor (mean/sum)
    n_cols,  # C
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    # loss.backward() passes a factor of exactly 1: the branch is taken on the device, so the
    # common case costs one scalar load per row and no host synchronisation.
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + row * stride_factor).to(tl.float32)
    if factor != 1.0:
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < n_cols
            g = tl.load(grad_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_row + cols, (g * factor).to(grad_row.dtype.element_ty), mask=mask)
