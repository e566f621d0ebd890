"""Triton kernels of ``vector_norm``: the norm of each row of an ``(R, N)`` matrix and its gradient.

The op layer (fusedls/ops/vector_norm.py) moves the reduced dimensions to the end, so every
call reduces contiguous rows. Which norm is a set of flag constexprs (``kind_flags`` maps ord):

  ord 1       (no flag)   sum |x|
  ord 2       SQUARE      sqrt(sum x^2)
  other p > 0 POWER       (sum |x|^p)^(1/p)
  p < 0       POWER, NEGATIVE
  ord inf     MAXIMUM     max |x|
  ord -inf    MAXIMUM, NEGATIVE   min |x|
  ord 0       NONZERO     number of non-zero elements (NaN counts)

State. Every partial result is a pair (r, s) per row, merged left to right:

* sums (ord 1, 2, p): ``norm^p = r^p * s``, r a reference magnitude. For ord 1 and 2, r is a
  power of two near the largest |x| (``_pow2_scale``: from the exponent bits, clamped to
  [2^-126, 2^126] so r and 1/r are normal), and ``|x| * (1/r)`` is exact: values near 1e30
  whose squares overflow fp32, or near 1e-30 whose squares underflow, sum without trouble (the
  LAPACK nrm2 idea, with exact scaling). For other p, r is the largest |x| (the smallest for
  p < 0, whose small elements dominate) and each term is ``(|x|/r)^p = 2^(p log2(|x|/r))`` <= 1;
  an element equal to r contributes exactly 1, which also settles r = 0 and r = inf.
  Merging (r1, s1), (r2, s2): r = max (min for p < 0), s = s1 (r1/r)^p + s2 (r2/r)^p.
  NaN needs no care: it reaches s, hence the norm.
* ord +-inf: r = max (min) |x| and s = how many elements equal it (the ties share the
  gradient, as in torch); NaN is tracked apart (tl.maximum may drop it) and makes r NaN.
* ord 0: s = the count; r unused.

Sweeps (one task's columns, chunk by chunk). Reducing each chunk across the program (max, then
the scaled sum) puts barriers between a chunk's loads and the next's, which keeps the sweep well
below the copy bandwidth. So the common ords keep per-lane state over the whole task, reduced once
at its end: ord 1 and 2 a plain fp32 sum of |x| or x^2, used as the state (1, sum) when it lies in
[SAFE_LOW, SAFE_HIGH], else the task is swept again the scaled way (``_sweep_chunks``); ord 0 the
count; ord +-inf the extreme |x| (fp32 min / max propagating NaN) and, only when a backward will
need them (TIES), the tie counts (the compares and selects per element limit these). General p
keeps the chunk-wise scaled sweep (each term costs a log2 and an exp2). Measured fractions of the
copy bandwidth per ord: docs/norms.md.

Launches. ``vector_norm_fwd_kernel`` is persistent: programs loop over tasks = (row block,
split) and sweep the task's columns in chunks of BLOCK_N. Short rows: (BLOCK_R, BLOCK_N) tiles
of several rows. Long rows, too few to occupy every SM (dim=None over a big tensor): each row
is cut into ``n_splits`` slices reduced to fp32 partials (stage 1, FINAL=False), and
``vector_norm_merge_kernel`` (stage 2) merges each row's partials in split order, so the bits
never depend on timing. With one split, stage 1 writes the norm itself (FINAL=True).

Gradient (``vector_norm_bwd_kernel``, one read of x, one write of dx, every element
independent; g = the upstream gradient of the row, n = its norm in fp32):

  ord 1:    g sgn(x)
  ord 2:    g x / n                          0 where x == 0 (also when n == 0)
  other p:  d n/d x = |x|^(p-1) sgn(x) / n^(p-1) = sgn(x) (|x|/n)^(p-1),  0 where x == 0
            (computed as 2^((p-1) log2(|x|/n)): no overflow of |x|^(p-1) or n^(p-1));
            at x == 0 torch multiplies its 0 by a factor of the row, n^(1-p) for p < 1, so an
            infinite norm gives NaN there, which is kept
  ord +-inf: g sgn(x) / c where |x| == n (c tied elements), 0 elsewhere
  ord 0:    no gradient
  sgn(NaN) = 0 as in torch; where x == 0 the zero is not forced if n is NaN (torch gives NaN).
  Infinite upstream gradients are not given torch's 0 * inf = NaN at the zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from . import tuning

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op


@triton.jit
def _pow2_scale(m):
    # (r, 1/r): powers of two with m / r in [1, 2) for normal m < 2^127, both normal fp32.
    e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent (0: zero or subnormal)
    k = tl.minimum(tl.maximum(e - 127, -126), 126)
    r = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return r, inv


@triton.jit
def _inverse(r):
    # 1 / r for r >= 0 as a pair (2^-k, 1 / (r 2^-k)), multiplied in that order: 1 / r itself
    # overflows fp32 for subnormal r; r 2^-k is in [1, 4) (at least 2^-23 for subnormal r).
    _, inv = _pow2_scale(r)
    return inv, 1.0 / (r * inv)


@triton.jit
def _rescale(
    s,  # fp32 partial sums (or counts)
    r,  # fp32 their reference magnitudes
    r_new,  # fp32 the common reference (max, or min for NEGATIVE, of the r merged)
    inv_new,  # fp32 1 / r_new for ord 1 and 2 (exact: a power of two); _inverse(r_new)[0] for POWER
    rinv_new,  # fp32 1.0 for ord 1 and 2; _inverse(r_new)[1] for POWER
    p,  # fp32 the order
    POWER: tl.constexpr,  # general p
    SQUARE: tl.constexpr,  # p == 2
):
    # s * (r / r_new)^p. For POWER the ratio is taken as exactly 1 when r == r_new (also 0/0 and
    # inf/inf), and raised to p as 2^(p log2 t): t is within 2 ulp, and log2 of t <= 1 is
    # accurate in absolute terms (log2 r - log2 r_new would lose 2^-17 for r near 1e30).
    t = r * inv_new * rinv_new
    if POWER:
        t = tl.where(r == r_new, 1.0, t)
        return s * tl.exp2(p * tl.log2(t))
    else:
        if SQUARE:
            t = t * t
        return s * t


@triton.jit
def _reduce(
    r,  # fp32 (BLOCK_R, B) reference magnitudes: |x| (stage 1) or partial r (stage 2)
    s,  # fp32 (BLOCK_R, B) or scalar: 1 per element (stage 1) or the partial sums / counts
    mask,  # (BLOCK_R, B) which entries exist
    p,  # fp32 the order
    MAXIMUM: tl.constexpr, NEGATIVE: tl.constexpr, POWER: tl.constexpr, SQUARE: tl.constexpr,
    NONZERO: tl.constexpr,
):  # fmt: skip
    # The (r, s) of each row of the tile (see the module docstring), reduced along axis 1.
    if NONZERO:
        rr = tl.zeros([r.shape[0]], tl.float32)
        ss = tl.sum(tl.where(mask, s, 0.0), 1)
    elif MAXIMUM:
        nan = mask & (r != r)
        clean = tl.where(mask & (r == r), r, float("inf") if NEGATIVE else -1.0)
        if NEGATIVE:
            rr = tl.min(clean, 1)
        else:
            rr = tl.max(clean, 1)
        ss = tl.sum(tl.where(mask & (clean == rr[:, None]), s, 0.0), 1)
        rr = tl.where(tl.max(nan.to(tl.int32), 1) > 0, float("nan"), rr)
    else:
        if NEGATIVE:
            rr = tl.min(tl.where(mask, r, float("inf")), 1)
        else:
            rr = tl.max(tl.where(mask, r, 0.0), 1)
        if POWER:
            inv, rinv = _inverse(rr)
            terms = _rescale(s, r, rr[:, None], inv[:, None], rinv[:, None], p, POWER, SQUARE)
        else:
            rr, inv = _pow2_scale(rr)
            terms = _rescale(s, r, rr[:, None], inv[:, None], 1.0, p, POWER, SQUARE)
        ss = tl.sum(tl.where(mask, terms, 0.0), 1)
    return rr, ss


@triton.jit
def _merge(
    r1, s1, r2, s2,  # fp32 (BLOCK_R,) two states of the same rows, merged in this order
    p,  # fp32 the order
    MAXIMUM: tl.constexpr, NEGATIVE: tl.constexpr, POWER: tl.constexpr, SQUARE: tl.constexpr,
    NONZERO: tl.constexpr,
):  # fmt: skip
    if NONZERO:
        r, s = r1, s1 + s2
    elif MAXIMUM:
        if NEGATIVE:
            r = tl.minimum(r1, r2)
        else:
            r = tl.maximum(r1, r2)
        s = tl.where(r1 == r, s1, 0.0) + tl.where(r2 == r, s2, 0.0)
        r = tl.where((r1 != r1) | (r2 != r2), float("nan"), r)
    else:
        if NEGATIVE:
            r = tl.minimum(r1, r2)
        else:
            r = tl.maximum(r1, r2)
        if POWER:
            inv, rinv = _inverse(r)
        else:  # r: a power of two in [2^-126, 2^126]; its exact reciprocal
            r, inv = _pow2_scale(r)
            rinv = 1.0
        s = _rescale(s1, r1, r, inv, rinv, p, POWER, SQUARE) + _rescale(s2, r2, r, inv, rinv, p, POWER, SQUARE)
    return r, s


@triton.jit
def _initial(
    rows,  # (BLOCK_R,) row indices, for the shape
    MAXIMUM: tl.constexpr, NEGATIVE: tl.constexpr, POWER: tl.constexpr,
):  # fmt: skip
    # The state of no element: s = 0 with the identity of the reference's max / min.
    zero = tl.zeros(rows.shape, tl.float32)
    if NEGATIVE:
        r = zero + float("inf")
    elif MAXIMUM or POWER:
        r = zero
    else:
        r = zero + 2.0**-126  # smallest power-of-two scale
    return r, zero


@triton.jit
def _finish(
    r, s,  # fp32 (BLOCK_R,) the merged state of whole rows
    p,  # fp32 the order
    MAXIMUM: tl.constexpr, POWER: tl.constexpr, SQUARE: tl.constexpr, NONZERO: tl.constexpr,
):  # fmt: skip
    if NONZERO:
        norm = s
    elif MAXIMUM:
        norm = r
    elif POWER:
        norm = r * tl.exp2(tl.log2(s) * (1.0 / p))  # s >= 1: the element at r gives 1
    elif SQUARE:
        norm = r * tl.sqrt_rn(s)
    else:
        norm = r * s
    return norm


@triton.jit
def _store_final(
    rows, row_mask, r, s, p, out_ptr, norm_ptr, count_ptr,
    MAXIMUM: tl.constexpr, POWER: tl.constexpr, SQUARE: tl.constexpr, NONZERO: tl.constexpr,
):  # fmt: skip
    # Writes the norm (output dtype and fp32) and, for ord +-inf, the tie count.
    norm = _finish(r, s, p, MAXIMUM, POWER, SQUARE, NONZERO)
    tl.store(out_ptr + rows, norm.to(out_ptr.dtype.element_ty), mask=row_mask)
    tl.store(norm_ptr + rows, norm, mask=row_mask)
    if MAXIMUM:
        tl.store(count_ptr + rows, s, mask=row_mask)


# A plain fp32 sum of squares (or |x|) is used when it lies in [SAFE_LOW, SAFE_HIGH]: no partial
# sum can then have overflowed (the terms are >= 0, so every partial is <= the total), and
# squares that fell below the normal range (|x| < 2^-63) are off by at most 2^-149 each, under
# 2^-80 of the total for any row of fewer than 2^60 elements. Its state is (r, s) = (1, sum).
# The upper bound leaves room to merge 2^27 such partials.
SAFE_LOW = tl.constexpr(2.0**-64)
SAFE_HIGH = tl.constexpr(2.0**100)


# The sweeps of one task below share their first arguments: x_rows, (BLOCK_R, 1) pointers to the
# rows' first elements; row_mask, (BLOCK_R,) the rows that exist; [start, end), the task's
# columns; n_cols = N.


@triton.jit
def _abs_chunk(x_rows, row_mask, c, n_cols, BLOCK_N: tl.constexpr):
    # |x| in fp32 of the columns [c, c + BLOCK_N) of the rows, 0 where absent, and the mask.
    cols = c + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    return tl.abs(tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)), mask


@triton.jit
def _sum_lanes(
    x_rows, row_mask, start, end, n_cols,
    SQUARE: tl.constexpr,  # sum x^2 (else |x|, or the non-zero count)
    NONZERO: tl.constexpr,  # count the non-zero elements (NaN counts)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Each lane keeps its own running sum over the chunks, reduced across the program once at
    # the end: no barrier inside the loop, so the next chunk's loads issue at once.
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for c in range(start, end, BLOCK_N):
        a, mask = _abs_chunk(x_rows, row_mask, c, n_cols, BLOCK_N)
        if NONZERO:
            acc += tl.where(a != 0.0, 1.0, 0.0)
        elif SQUARE:
            acc += a * a
        else:
            acc += a
    return tl.sum(acc, 1)


@triton.jit
def _extreme_lanes(
    x_rows, row_mask, start, end, n_cols,
    NEGATIVE: tl.constexpr,  # the minimum |x| (else the maximum)
    TIES: tl.constexpr,  # count the elements equal to it (else s = 0)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # (r, s) of ord +-inf with per-lane state: the extreme |x| each lane has seen (fp32 min / max
    # that propagate NaN: one instruction) and, with TIES, how many elements equal it.
    if NEGATIVE:
        m = tl.full([BLOCK_R, BLOCK_N], float("inf"), tl.float32)
    else:
        m = tl.full([BLOCK_R, BLOCK_N], -1.0, tl.float32)  # below every |x|: absent elements
    ties = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for c in range(start, end, BLOCK_N):
        a, mask = _abs_chunk(x_rows, row_mask, c, n_cols, BLOCK_N)
        if NEGATIVE:
            m_new = tl.minimum(m, tl.where(mask, a, float("inf")), propagate_nan=tl.PropagateNan.ALL)
        else:
            m_new = tl.maximum(m, tl.where(mask, a, -1.0), propagate_nan=tl.PropagateNan.ALL)
        if TIES:  # about as many operations again: the loop becomes compute-bound (bf16)
            ties = tl.where(m_new == m, ties, 0.0) + tl.where(mask & (a == m_new), 1.0, 0.0)
        m = m_new
    nan = tl.max((m != m).to(tl.int32), 1) > 0
    if NEGATIVE:
        best = tl.min(tl.where(m == m, m, float("inf")), 1)
    else:
        best = tl.max(tl.where(m == m, m, -1.0), 1)
    s = tl.sum(tl.where(m == best[:, None], ties, 0.0), 1)
    # no element: r = -1 (the max) or inf (the min) with no ties, which merges as no element
    r = tl.where(nan, float("nan"), best)
    return r, s


@triton.jit
def _sweep_chunks(
    x_rows, row_mask, start, end, n_cols,
    rows,  # (BLOCK_R,) row indices
    p,  # fp32 the order
    MAXIMUM: tl.constexpr, NEGATIVE: tl.constexpr, POWER: tl.constexpr, SQUARE: tl.constexpr,
    NONZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # (r, s) reduced chunk by chunk (each chunk's scaled state merged into the running one): the
    # path of general p, and of ord 1 and 2 when the plain sum is unsafe.
    r, s = _initial(rows, MAXIMUM, NEGATIVE, POWER)
    for c in range(start, end, BLOCK_N):
        a, mask = _abs_chunk(x_rows, row_mask, c, n_cols, BLOCK_N)
        rc, sc = _reduce(a, 1.0, mask, p, MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO)
        r, s = _merge(r, s, rc, sc, p, MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO)
    return r, s


@triton.jit
def vector_norm_fwd_kernel(
    x_ptr,  # *T (R, N) rows; columns contiguous, rows stride_row elements apart
    stride_row,  # elements between consecutive rows
    out_ptr,  # *U (R,) out (FINAL): the norm in the output dtype
    norm_ptr,  # *fp32 (R,) out (FINAL): the norm in fp32, for backward
    count_ptr,  # *fp32 (R,) out (FINAL and MAXIMUM): elements tied at the norm
    part_r_ptr,  # *fp32 (R, n_splits) out (not FINAL): reference magnitude of each slice
    part_s_ptr,  # *fp32 (R, n_splits) out (not FINAL): scaled sum / tie count of each slice
    n_rows,  # R
    n_cols,  # N
    chunks_per_split,  # BLOCK_N-column chunks of each slice (all of a row's when one split)
    n_splits,  # slices per row
    p,  # fp32 the order (unused by the flags that fix it)
    MAXIMUM: tl.constexpr,  # ord +-inf
    NEGATIVE: tl.constexpr,  # the reference is the minimum: ord -inf, or p < 0
    POWER: tl.constexpr,  # general p (not 0, 1, 2, +-inf)
    SQUARE: tl.constexpr,  # ord 2
    NONZERO: tl.constexpr,  # ord 0
    TIES: tl.constexpr,  # MAXIMUM and a backward may follow: count the ties (else count 0)
    FINAL: tl.constexpr,  # one split: write the norm, not partials
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    n_tasks = tl.cdiv(n_rows, BLOCK_R) * n_splits
    for task in range(tl.program_id(0), n_tasks, tl.num_programs(0)):
        split = task % n_splits
        rows = (task // n_splits).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        # Slices are whole chunks, so only n_cols masks (a mask the loads can be vectorised
        # under, when n_cols is a multiple of the vector), and every chunk starts aligned.
        start = split.to(tl.int64) * chunks_per_split * BLOCK_N
        end = tl.minimum(start + chunks_per_split * BLOCK_N, n_cols)
        x_rows = x_ptr + rows[:, None] * stride_row
        if MAXIMUM:
            r, s = _extreme_lanes(x_rows, row_mask, start, end, n_cols, NEGATIVE, TIES, BLOCK_R, BLOCK_N)
        elif NONZERO:
            r, s = _initial(rows, MAXIMUM, NEGATIVE, POWER)
            s = _sum_lanes(x_rows, row_mask, start, end, n_cols, False, True, BLOCK_R, BLOCK_N)
        elif POWER:
            r, s = _sweep_chunks(x_rows, row_mask, start, end, n_cols, rows, p,
                                 MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO, BLOCK_N)  # fmt: skip
        else:
            # ord 1, 2: the plain sum, unless a row's sum is outside [SAFE_LOW, SAFE_HIGH] (or not
            # finite): then the scaled sweep again, for the rows' sake (see the module docstring).
            plain = _sum_lanes(x_rows, row_mask, start, end, n_cols, SQUARE, False, BLOCK_R, BLOCK_N)
            safe = (plain >= SAFE_LOW) & (plain <= SAFE_HIGH)
            r, s = _initial(rows, MAXIMUM, NEGATIVE, POWER)
            if tl.sum((row_mask & ~safe).to(tl.int32)) > 0:
                r, s = _sweep_chunks(x_rows, row_mask, start, end, n_cols, rows, p,
                                     MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO, BLOCK_N)  # fmt: skip
            r = tl.where(safe, 1.0, r)
            s = tl.where(safe, plain, s)
        if FINAL:
            _store_final(rows, row_mask, r, s, p, out_ptr, norm_ptr, count_ptr, MAXIMUM, POWER, SQUARE, NONZERO)
        else:
            tl.store(part_r_ptr + rows * n_splits + split, r, mask=row_mask)
            tl.store(part_s_ptr + rows * n_splits + split, s, mask=row_mask)


@triton.jit
def vector_norm_merge_kernel(
    part_r_ptr,  # *fp32 (R, n_splits) reference magnitudes written by stage 1
    part_s_ptr,  # *fp32 (R, n_splits) scaled sums / tie counts written by stage 1
    out_ptr,  # *U (R,) out: the norm in the output dtype
    norm_ptr,  # *fp32 (R,) out: the norm in fp32
    count_ptr,  # *fp32 (R,) out (MAXIMUM): elements tied at the norm
    n_rows,  # R
    n_splits,  # partials per row
    p,  # fp32 the order
    MAXIMUM: tl.constexpr,  # as in vector_norm_fwd_kernel
    NEGATIVE: tl.constexpr,
    POWER: tl.constexpr,
    SQUARE: tl.constexpr,
    NONZERO: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials per chunk
):
    # One program per row; the partials are merged chunk after chunk in split order.
    row = tl.program_id(0).to(tl.int64)
    rows = row + tl.arange(0, 1)
    r, s = _initial(rows, MAXIMUM, NEGATIVE, POWER)
    for c in range(0, n_splits, BLOCK_S):
        offs = c + tl.arange(0, BLOCK_S)
        mask = (offs < n_splits)[None, :] & (rows < n_rows)[:, None]
        at = rows[:, None] * n_splits + offs[None, :]
        pr = tl.load(part_r_ptr + at, mask=mask, other=1.0)
        ps = tl.load(part_s_ptr + at, mask=mask, other=0.0)
        rc, sc = _reduce(pr, ps, mask, p, MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO)
        r, s = _merge(r, s, rc, sc, p, MAXIMUM, NEGATIVE, POWER, SQUARE, NONZERO)
    _store_final(rows, rows < n_rows, r, s, p, out_ptr, norm_ptr, count_ptr, MAXIMUM, POWER, SQUARE, NONZERO)


@triton.jit
def vector_norm_bwd_kernel(
    grad_ptr,  # *G (R,) upstream gradient of each row's norm
    stride_grad,  # elements between rows' gradients (0: one broadcast value)
    x_ptr,  # *T (R, N) the rows of forward; columns contiguous
    stride_row,  # elements between consecutive rows of x
    norm_ptr,  # *fp32 (R,) the norms (fp32, from forward)
    count_ptr,  # *fp32 (R,) elements tied at the norm (MAXIMUM only)
    dx_ptr,  # *T (R, N) out: the gradient, contiguous
    n_rows,  # R
    n_cols,  # N
    p,  # fp32 the order (POWER only)
    MAXIMUM: tl.constexpr,  # ord +-inf
    POWER: tl.constexpr,  # general p
    SQUARE: tl.constexpr,  # ord 2
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile
):
    # One (BLOCK_R, BLOCK_N) tile per program; the formulas are in the module docstring.
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    tile = tl.program_id(0).to(tl.int64)
    rows = (tile // n_col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    g = tl.load(grad_ptr + rows * stride_grad, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    n = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)[:, None]
    x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sgn = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    if MAXIMUM:
        c = tl.load(count_ptr + rows, mask=row_mask, other=1.0)[:, None]
        dx = tl.where(tl.abs(x) == n, sgn * (g / c), 0.0)
    elif POWER:
        inv, rinv = _inverse(n)
        t = tl.abs(x) * inv * rinv  # |x| / n: x == 0 gives 0, n == 0 inf, inf / inf NaN
        # torch's 0 at x == 0 is 0 * (a factor of the row): NaN when n is NaN, or (p < 1) inf
        finite = tl.where(p > 1.0, n == n, n < float("inf"))
        dx = tl.where((x == 0) & finite, 0.0, sgn * tl.exp2((p - 1.0) * tl.log2(t)) * g)
    elif SQUARE:
        dx = tl.where((x == 0) & (n == n), 0.0, x / n * g)
    else:
        dx = sgn * g
    tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launchers


def kind_flags(ord: float) -> dict:
    """The flag constexprs of norm order ``ord`` (a float, not NaN)."""
    maximum = ord in (float("inf"), float("-inf"))
    power = not maximum and ord not in (0.0, 1.0, 2.0)
    return dict(MAXIMUM=maximum, NEGATIVE=ord < 0, POWER=power, SQUARE=ord == 2.0, NONZERO=ord == 0.0)


def _backward_flags(ord: float) -> dict:
    flags = kind_flags(ord)
    return dict(MAXIMUM=flags["MAXIMUM"], POWER=flags["POWER"], SQUARE=flags["SQUARE"])


def vector_norm_forward(rows: torch.Tensor, ord: float, out: torch.Tensor, norm: torch.Tensor, count) -> None:
    """See :func:`fusedls.backend.eager.vector_norm.vector_norm_forward` for the contract (``norm``,
    ``count``: fp32; ``rows`` (R, N), N >= 1, columns contiguous)."""
    n_rows, n_cols = rows.shape
    if n_rows == 0:
        return
    flags = kind_flags(ord)
    ties = flags["MAXIMUM"] and count.numel() > 0
    if flags["MAXIMUM"] and not ties:  # no backward will read the counts: somewhere to write 0s
        count = torch.empty_like(norm)
    cfg = tuning.vector_norm_config(n_rows, n_cols, rows.element_size())
    n_row_blocks = triton.cdiv(n_rows, cfg.block_r)
    splits, per_split = tuning.vector_norm_split(rows.device, n_row_blocks, n_cols, cfg.block_n)
    per_sm = tuning.VECTOR_NORM_PROGRAMS_PER_SM if splits == 1 else tuning.VECTOR_NORM_SPLIT_PROGRAMS_PER_SM
    programs = tuning.vector_norm_sms(rows.device) * per_sm
    grid = (min(n_row_blocks * splits, programs),)
    if splits == 1:
        part_r = part_s = norm
    else:
        part_r = torch.empty((n_rows, splits), device=rows.device, dtype=torch.float32)
        part_s = torch.empty_like(part_r)
    launch(vector_norm_fwd_kernel, grid,
        rows, rows.stride(0), out, norm, count if count.numel() else norm, part_r, part_s,
        n_rows, n_cols, triton.cdiv(per_split, cfg.block_n), splits, float(ord),
        TIES=ties, FINAL=splits == 1, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, **flags, **cfg.launch_options(),
    )  # fmt: skip
    if splits > 1:
        block_s = min(triton.next_power_of_2(splits), tuning.VECTOR_NORM_MERGE_BLOCK)
        merge_grid = (n_rows,)
        launch(vector_norm_merge_kernel, merge_grid,
            part_r, part_s, out, norm, count if count.numel() else norm, n_rows, splits, float(ord),
            BLOCK_S=block_s, num_warps=tuning.VECTOR_NORM_MERGE_WARPS, **flags,
        )  # fmt: skip


def vector_norm_backward(grad: torch.Tensor, rows: torch.Tensor, norm, count, ord: float, dx) -> None:
    """See :func:`fusedls.backend.eager.vector_norm.vector_norm_backward` for the contract (``dx``
    contiguous; ``grad`` of any stride)."""
    n_rows, n_cols = rows.shape
    if dx.numel() == 0:
        return
    cfg = tuning.vector_norm_config(n_rows, n_cols, rows.element_size())
    tiles = triton.cdiv(n_rows, cfg.block_r) * triton.cdiv(n_cols, cfg.block_n)
    grid = (tiles,)
    launch(vector_norm_bwd_kernel, grid,
        grad, grad.stride(0), rows, rows.stride(0), norm, count if count.numel() else norm, dx,
        n_rows, n_cols, float(ord),
        BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, **_backward_flags(ord), **cfg.launch_options(),
    )  # fmt: skip
