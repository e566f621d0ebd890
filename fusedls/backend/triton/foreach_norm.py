"""Multi-tensor Triton kernels: per-tensor and total norms, in-place scaling (gradient clipping)
and the L1/L2 penalties' gradients, for any number of tensors in a fixed number of launches.

The tensor table (``fusedls/backend/triton/foreach_table.py``). The launchers never pass tensors one
by one: one int64 device tensor describes the ``n`` tensors of a call, in dtype groups, with
where each starts (an element offset from its group's first tensor), its size and work items.

Work items. One work item is ``CHUNKS`` consecutive chunks of ``BLOCK`` elements of one tensor
(item_start is a multiple of ``CHUNKS * BLOCK``; a tensor's last item may be shorter), and one
program of the elementwise kernels handles one work item: a launch covers every tensor of a dtype
group. The program looks its tensor up once (three dependent loads: item -> tensor -> offset and
numel) and then loads the whole item as one (CHUNKS, BLOCK) tile, so the loads of all its chunks
are in flight together (``CHUNKS * BLOCK / (32 * num_warps)`` elements a thread); the partial
kernel writes one partial pair per item. Only a tensor's last item, when the tensor ends inside
it, takes a masked branch. tuning.py's ``FOREACH_NORM_CHUNKS`` has the model behind the default.

Offsets, not raw addresses, so that loads stay vectorised: see foreach_table.py.

Dtype groups. A pointer's element type is a compile-time property, so tensors are grouped by
dtype and the elementwise kernels run once per group (one launch per dtype: bf16, fp16 and fp32
in one list make three); the merge kernels read fp32 partials and run once for all groups.

Norm kinds (``KIND``) and the fp32 partial pair (a, b) of a work item:

  KIND_POW  ord p not in {0, 1, inf, -inf} (IS_TWO: p = 2): a = max |x| = s,
            b = sum (|x| / s)^p. Scaling by the item's largest element makes the sum
            overflow-safe (LAPACK nrm2's idea): fp32 gradients of 1e30 give a finite norm.
            s is 0 (all zeros) or inf (an inf element): then b is the unscaled sum.
  KIND_L1   a = sum |x|
  KIND_MAX  a = max |x|, b = 1 if a NaN was seen (torch's inf-norm propagates NaN)
  KIND_MIN  a = min |x|, b = as for MAX
  KIND_L0   a = number of non-zero elements (NaN counts)

Two merges in a fixed order, so the bits do not depend on scheduling (no atomics):
stage 2 (one program per tensor) merges the tensor's item partials in item order, stage 3 (one
program) merges the per-tensor pairs in tensor order. Merging scaled pairs (s_i, b_i):
s = max s_i, b = sum b_i (s_i / s)^p, and the norm is s * b^(1/p) (0^(1/p) when b = 0); when
s is 0 or inf, b is kept unscaled (the norm is b^(1/p): p < 0 with an inf element).

Gradients (penalties): d/dw sum |w| = sign(w) (0 at 0, NaN at NaN), d/dw sum w^2 = 2w; the
backward kernel writes ``g * sign(w)`` or ``g * 2w`` (g: the upstream gradient, a device scalar)
into each gradient tensor. Clipping is the same kernel writing ``coef * x`` over x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .foreach_table import table
from .launch import launch
from .tuning import foreach_norm_config, foreach_norm_merge_config

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op

KIND_POW, KIND_L1, KIND_MAX, KIND_MIN, KIND_L0 = 0, 1, 2, 3, 4
MAP_SCALE, MAP_SIGN, MAP_TWICE = 0, 1, 2


# ------------------------------------------------------------------------------------ kernels


@triton.jit
def _pow(v, p, IS_TWO: tl.constexpr):
    # v^p for v >= 0 (v = 0: 0 for p > 0, inf for p < 0)
    if IS_TWO:
        return v * v
    return tl.exp2(p * tl.log2(v))


@triton.jit
def _tensor_ptr(
    like_ptr,  # *T base of the group
    table_ptr,  # *i64 offsets in elements
    t,  # tensor index
    ALIGNED: tl.constexpr,  # the offset is a multiple of 16 bytes
):
    # Pointer to tensor t's first element.
    offset = tl.load(table_ptr + t)
    if ALIGNED:
        offset = tl.multiple_of(offset, 128 // like_ptr.dtype.element_ty.primitive_bitwidth)
    return like_ptr + offset


@triton.jit
def _work_item(
    item_tensor_ptr,  # *i64 (items,) tensor of each work item
    item_start_ptr,  # *i64 (items,) first element of each work item
    numel_ptr,  # *i64 (n,) elements of each tensor
    table_ptr,  # *i64 (n,) offset of each tensor from like_ptr, in elements
    like_ptr,  # *T the base of every offset
    item_base,  # first work item of this launch
    ALIGNED: tl.constexpr,  # every tensor of the group starts 16-byte aligned
    SIZE: tl.constexpr,  # elements per work item (CHUNKS * BLOCK): item starts are multiples of it
):
    # This program's work item: (item, tensor, first element, pointer to it, elements of the
    # tensor from there on). Three dependent loads: item -> tensor -> offset and numel.
    item = item_base + tl.program_id(0).to(tl.int64)
    t = tl.load(item_tensor_ptr + item)
    start = tl.multiple_of(tl.load(item_start_ptr + item), SIZE)
    src = _tensor_ptr(like_ptr, table_ptr, t, ALIGNED) + start
    return item, t, start, src, tl.load(numel_ptr + t) - start


@triton.jit
def _item_offsets(
    CHUNKS: tl.constexpr,  # chunks per work item
    BLOCK: tl.constexpr,  # elements per chunk
):
    # (CHUNKS, BLOCK) int32 offsets from the item's first element (a scalar pointer), chunk c in
    # row c: int64 offsets would take two registers per element (the item has < 2^31 elements).
    return tl.arange(0, CHUNKS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]


@triton.jit
def _load_item(
    src,  # *T the item's first element
    rel,  # (CHUNKS, BLOCK) int32 offsets in the item (_item_offsets)
    left,  # int32 elements of the tensor from src on (MASKED only: fewer than CHUNKS * BLOCK)
    MASKED: tl.constexpr,  # the tensor ends inside the item
):
    # fp32 item (0 past the end). An item inside the tensor loads without a mask, so its loads
    # vectorise and, being one tile, are all issued before the first is used.
    if MASKED:
        x = tl.load(src + rel, mask=rel < left, other=0.0).to(tl.float32)
    else:
        x = tl.load(src + rel).to(tl.float32)
    return x


@triton.jit
def _valid(
    v,  # (CHUNKS, BLOCK) values
    rel,  # (CHUNKS, BLOCK) int32 offsets in the item
    left,  # int32 elements of the tensor in the item (MASKED only)
    fill,  # the value past the end
    MASKED: tl.constexpr,  # the tensor ends inside the item
):
    # v, with ``fill`` past the tensor's end (a full item: v itself, no mask kept in registers)
    if MASKED:
        v = tl.where(rel < left, v, fill)
    return v


@triton.jit
def _item_partial(
    src,  # *T the item's first element
    rel,  # (CHUNKS, BLOCK) int32 offsets in the item
    left,  # int32 elements of the tensor in the item (MASKED only)
    p,  # fp32 the order (KIND_POW only)
    KIND: tl.constexpr,  # as in foreach_norm_partial_kernel
    IS_TWO: tl.constexpr,  # p == 2 (KIND_POW)
    MASKED: tl.constexpr,  # the tensor ends inside the item
):
    # The partial pair (a, b) of one work item (see the module docstring). Masked-out elements
    # load as 0, which is neutral for every kind but p < 0 (0^p = inf) and MIN: those are masked.
    x = tl.abs(_load_item(src, rel, left, MASKED))
    b = 0.0
    if KIND == 0:  # KIND_POW: s = max |x|, b = sum (|x| / s)^p over the whole item
        a = _tile_max(x)
        scaled = (a > 0.0) & (a < float("inf"))
        # x / s without overflowing 1 / s when s is subnormal: lift both by 2^64 first
        lift = tl.where(a < 1e-19, 18446744073709551616.0, 1.0)
        inv = tl.where(scaled, 1.0 / (a * lift), 1.0)
        v = x * tl.where(scaled, lift, 1.0) * inv
        b = _tile_sum(_valid(_pow(v, p, IS_TWO), rel, left, 0.0, MASKED and not IS_TWO))
    elif KIND == 1:  # KIND_L1
        a = _tile_sum(x)
    elif KIND == 4:  # KIND_L0 (NaN != 0 counts, as in torch)
        a = _tile_sum(tl.where(x != 0.0, 1.0, 0.0))
    else:  # KIND_MAX / KIND_MIN, and whether a NaN was seen
        b = _tile_max(tl.where(x != x, 1.0, 0.0))
        if KIND == 2:
            a = _tile_max(x)
        else:
            a = _tile_min(_valid(x, rel, left, float("inf"), MASKED))
    return a, b


# Reductions of a (CHUNKS, BLOCK) tile: across the chunks (within each thread) first, then across
# threads; a fixed tree, the layout being fixed at compile time.
@triton.jit
def _tile_max(x):
    return tl.max(tl.max(x, 0), 0)


@triton.jit
def _tile_min(x):
    return tl.min(tl.min(x, 0), 0)


@triton.jit
def _tile_sum(x):
    return tl.sum(tl.sum(x, 0), 0)


@triton.jit
def foreach_norm_partial_kernel(
    table_ptr,  # *i64 (n,) offset of each tensor from like_ptr, in elements
    numel_ptr,  # *i64 (n,) elements of each tensor
    item_tensor_ptr,  # *i64 (items,) tensor of each work item
    item_start_ptr,  # *i64 (items,) first element of each work item (a multiple of CHUNKS * BLOCK)
    like_ptr,  # *T the first tensor of this launch's dtype group: the base of every offset
    part_a_ptr,  # *fp32 (items,) out: first partial of each work item (see the module docstring)
    part_b_ptr,  # *fp32 (items,) out: second partial of each work item
    item_base,  # first work item of this launch (its dtype group)
    p,  # fp32 the order (KIND_POW only)
    KIND: tl.constexpr,  # KIND_POW, KIND_L1, KIND_MAX, KIND_MIN or KIND_L0
    IS_TWO: tl.constexpr,  # p == 2 (KIND_POW)
    ALIGNED: tl.constexpr,  # every tensor of the group starts 16-byte aligned
    CHUNKS: tl.constexpr,  # chunks per work item (a power of two)
    BLOCK: tl.constexpr,  # elements per chunk
):
    item, _, _, src, left = _work_item(item_tensor_ptr, item_start_ptr, numel_ptr, table_ptr, like_ptr, item_base,
                                       ALIGNED, CHUNKS * BLOCK)  # fmt: skip
    rel = _item_offsets(CHUNKS, BLOCK)
    if left >= CHUNKS * BLOCK:
        a, b = _item_partial(src, rel, left, p, KIND, IS_TWO, False)
    else:
        a, b = _item_partial(src, rel, left.to(tl.int32), p, KIND, IS_TWO, True)
    tl.store(part_a_ptr + item, a)
    tl.store(part_b_ptr + item, b)


@triton.jit
def _merge(
    a_ptr,  # *fp32 partials (first of the pair)
    b_ptr,  # *fp32 partials (second of the pair)
    begin,  # first partial to merge
    end,  # one past the last
    p,  # fp32 the order (KIND_POW)
    KIND: tl.constexpr,  # as in foreach_norm_partial_kernel
    IS_TWO: tl.constexpr,  # p == 2
    BLOCK: tl.constexpr,  # partials per step (the order of the sums is fixed by it)
):
    # (a, b) of the partials [begin, end), merged in a fixed order.
    acc_a = tl.zeros((BLOCK,), tl.float32)
    if KIND == 3:
        acc_a += float("inf")
    acc_b = tl.zeros((BLOCK,), tl.float32)
    for start in range(begin, end, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        m = i < end
        a = tl.load(a_ptr + i, mask=m, other=0.0 if KIND != 3 else float("inf"))
        if KIND == 0 or KIND == 2:
            acc_a = tl.maximum(acc_a, a)
        elif KIND == 3:
            acc_a = tl.minimum(acc_a, a)
        else:
            acc_a += a
        if KIND == 2 or KIND == 3:
            acc_b = tl.maximum(acc_b, tl.load(b_ptr + i, mask=m, other=0.0))
    if KIND == 0 or KIND == 2:
        s = tl.max(acc_a, 0)
    elif KIND == 3:
        s = tl.min(acc_a, 0)
    else:
        s = tl.sum(acc_a, 0)
    if KIND == 0:
        # b = sum b_i (s_i / s)^p. When s is 0 or inf, b is an unscaled sum: b_i s_i^p for a
        # scaled b_i (0 < s_i < inf), b_i itself for an unscaled one (s_i 0 or inf).
        scaled = (s > 0.0) & (s < float("inf"))
        for start in range(begin, end, BLOCK):
            i = start + tl.arange(0, BLOCK).to(tl.int64)
            m = i < end
            a = tl.load(a_ptr + i, mask=m, other=0.0)
            ratio = tl.where(scaled, a / s, tl.where((a > 0.0) & (a < float("inf")), a, 1.0))
            acc_b += tl.where(m, tl.load(b_ptr + i, mask=m, other=0.0) * _pow(ratio, p, IS_TWO), 0.0)
    return s, tl.max(acc_b, 0) if (KIND == 2 or KIND == 3) else tl.sum(acc_b, 0)


@triton.jit
def _finish(
    a,  # fp32 merged first partial
    b,  # fp32 merged second partial
    p,  # fp32 the order
    KIND: tl.constexpr,  # as in foreach_norm_partial_kernel
    IS_TWO: tl.constexpr,  # p == 2
    SQUARE: tl.constexpr,  # return the norm squared (the L2 penalty: s^2 b, no sqrt)
):
    # The norm of a merged pair.
    if KIND == 0:
        if SQUARE:
            return a * a * b
        if IS_TWO:
            root = tl.sqrt(b)
        else:
            root = tl.exp2(tl.log2(b) / p)
        zero = tl.where(p > 0, 0.0, float("inf"))  # 0^(1/p): no element at all (empty tensors)
        return tl.where(b == 0.0, zero, tl.where((a > 0.0) & (a < float("inf")), a, 1.0) * root)
    if KIND == 2 or KIND == 3:
        return tl.where(b > 0.0, float("nan"), a)
    return a


@triton.jit
def foreach_norm_merge_kernel(
    first_ptr,  # *i64 (n + 1,) first work item of each tensor
    out_index_ptr,  # *i64 (n,) position of each tensor's norm in norm_ptr
    part_a_ptr,  # *fp32 (items,) work item partials from foreach_norm_partial_kernel
    part_b_ptr,  # *fp32 (items,)
    tensor_a_ptr,  # *fp32 (n,) out: merged pair of each tensor (table order)
    tensor_b_ptr,  # *fp32 (n,)
    norm_ptr,  # *fp32 (n,) out: the norm of each tensor (WRITE_NORM only), caller's order
    p,  # fp32 the order (KIND_POW)
    KIND: tl.constexpr,  # as in foreach_norm_partial_kernel
    IS_TWO: tl.constexpr,  # p == 2
    WRITE_NORM: tl.constexpr,  # write the per-tensor norms
    BLOCK: tl.constexpr,  # partials merged per step
):
    t = tl.program_id(0).to(tl.int64)
    a, b = _merge(part_a_ptr, part_b_ptr, tl.load(first_ptr + t), tl.load(first_ptr + t + 1), p, KIND, IS_TWO, BLOCK)
    tl.store(tensor_a_ptr + t, a)
    tl.store(tensor_b_ptr + t, b)
    if WRITE_NORM:
        tl.store(norm_ptr + tl.load(out_index_ptr + t), _finish(a, b, p, KIND, IS_TWO, False))


@triton.jit
def foreach_norm_total_kernel(
    tensor_a_ptr,  # *fp32 (n,) per-tensor pairs from foreach_norm_merge_kernel
    tensor_b_ptr,  # *fp32 (n,)
    total_ptr,  # *fp32 () out: the norm of all the tensors together
    coef_ptr,  # *fp32 () out: min(max_norm / (total + 1e-6), 1) (WRITE_COEF only)
    n_tensors,  # n
    p,  # fp32 the order (KIND_POW)
    max_norm,  # fp32 clipping threshold (WRITE_COEF only)
    KIND: tl.constexpr,  # as in foreach_norm_partial_kernel
    IS_TWO: tl.constexpr,  # p == 2
    SQUARE: tl.constexpr,  # write the squared norm (KIND_POW, the L2 penalty)
    NORM_OF_NORMS: tl.constexpr,  # KIND_L0: count the tensors with a non-zero, as clip_grad_norm_
    WRITE_COEF: tl.constexpr,  # also write the clipping coefficient
    BLOCK: tl.constexpr,  # tensors merged per step
):
    if NORM_OF_NORMS:  # ||(||g_t||_0)_t||_0: tensors whose count is not 0
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_tensors, BLOCK):
            i = start + tl.arange(0, BLOCK).to(tl.int64)
            acc += tl.where(tl.load(tensor_a_ptr + i, mask=i < n_tensors, other=0.0) != 0.0, 1.0, 0.0)
        total = tl.sum(acc, 0)
    else:
        a, b = _merge(tensor_a_ptr, tensor_b_ptr, 0, n_tensors, p, KIND, IS_TWO, BLOCK)
        total = _finish(a, b, p, KIND, IS_TWO, SQUARE)
    tl.store(total_ptr, total)
    if WRITE_COEF:
        tl.store(coef_ptr, tl.minimum(max_norm / (total + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL))  # as torch


@triton.jit
def _map_value(
    x,  # fp32 source elements
    g,  # fp32 the factor
    MODE: tl.constexpr,  # as in foreach_map_kernel
    OUT: tl.constexpr,  # the destination's element type
):
    # g x, g sign(x) or g 2x, in the destination's dtype
    if MODE == 1:  # d|x|/dx = sign(x): 0 at 0, NaN at NaN
        x = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x * 0.0))
    elif MODE == 2:  # d x^2 / dx = 2x
        x = 2.0 * x
    return (x * g).to(OUT)


@triton.jit
def foreach_map_kernel(
    src_table_ptr,  # *i64 (n,) offset of each source tensor from like_ptr, in elements
    dst_table_ptr,  # *i64 (n,) offset of each destination from out_like_ptr (in place: src_table_ptr)
    numel_ptr,  # *i64 (n,) elements of each tensor
    item_tensor_ptr,  # *i64 (items,) tensor of each work item
    item_start_ptr,  # *i64 (items,) first element of each work item (a multiple of CHUNKS * BLOCK)
    coef_ptr,  # *fp32 () the factor g (clip coefficient or upstream gradient)
    like_ptr,  # *T the first source tensor of this launch's dtype group
    out_like_ptr,  # *To the first destination tensor of the group
    item_base,  # first work item of this launch (its dtype group)
    MODE: tl.constexpr,  # MAP_SCALE: g x (in place only), MAP_SIGN: g sign(x), MAP_TWICE: g 2x
    ALIGNED: tl.constexpr,  # every source tensor of the group starts 16-byte aligned
    OUT_ALIGNED: tl.constexpr,  # every destination tensor of the group starts 16-byte aligned
    CHUNKS: tl.constexpr,  # chunks per work item (a power of two)
    BLOCK: tl.constexpr,  # elements per chunk
):
    g = tl.load(coef_ptr)
    work = True
    if MODE == 0:
        # MAP_SCALE is in place (scale_, the clip): a factor of exactly 1 (a clip that clips
        # nothing: coef = min(max_norm / norm, 1)) leaves every element as it is (x * 1 = x in
        # fp32, then the same rounding back), so the program reads and writes nothing: such a
        # clip_grad_norm_ moves the gradients' bytes once (the norm), not three times.
        work = g != 1.0
    if work:
        _, t, start, src, left = _work_item(item_tensor_ptr, item_start_ptr, numel_ptr, src_table_ptr, like_ptr,
                                            item_base, ALIGNED, CHUNKS * BLOCK)  # fmt: skip
        dst = _tensor_ptr(out_like_ptr, dst_table_ptr, t, OUT_ALIGNED) + start
        rel = _item_offsets(CHUNKS, BLOCK)
        if left >= CHUNKS * BLOCK:
            tl.store(dst + rel, _map_value(_load_item(src, rel, left, False), g, MODE, out_like_ptr.dtype.element_ty))
        else:
            tail = left.to(tl.int32)  # fewer than CHUNKS * BLOCK
            y = _map_value(_load_item(src, rel, tail, True), g, MODE, out_like_ptr.dtype.element_ty)
            tl.store(dst + rel, y, mask=rel < tail)


# -------------------------------------------------------------------------------- launchers


def _kind(ord: float) -> int:
    return {1.0: KIND_L1, float("inf"): KIND_MAX, float("-inf"): KIND_MIN, 0.0: KIND_L0}.get(ord, KIND_POW)


def _reduce(tensors, ord, write_norm, norms=None):
    """Stages 1 and 2: (table, per-tensor a, per-tensor b); per-tensor norms into ``norms``."""
    cfg = foreach_norm_config()
    tab = table(tensors, cfg.item)
    kind, p = _kind(ord), float(ord)
    dev = tensors[0].device
    part_a = torch.empty(tab.items, device=dev, dtype=torch.float32)
    part_b = torch.empty_like(part_a)
    for t0, _, i0, i1, aligned in tab.groups:
        if i1 > i0:
            launch(foreach_norm_partial_kernel, (i1 - i0,),
                tab.offset, tab.numel, tab.item_tensor, tab.item_start, tensors[tab.order[t0]], part_a, part_b, i0,
                p, KIND=kind, IS_TWO=p == 2.0, ALIGNED=aligned, CHUNKS=cfg.chunks, BLOCK=cfg.block_c,
                **cfg.launch_options(),
            )  # fmt: skip
    tensor_a = torch.empty(tab.n, device=dev, dtype=torch.float32)
    tensor_b = torch.empty_like(tensor_a)
    merge = foreach_norm_merge_config()
    launch(foreach_norm_merge_kernel, (tab.n,),
        tab.first, tab.out_index, part_a, part_b, tensor_a, tensor_b, norms if write_norm else tensor_a, p,
        KIND=kind, IS_TWO=p == 2.0, WRITE_NORM=write_norm, BLOCK=merge.block_c, **merge.launch_options(),
    )  # fmt: skip
    return tab, tensor_a, tensor_b


def foreach_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """fp32 (n,) norm of each tensor (contiguous, one device, non-empty list)."""
    norms = torch.empty(len(tensors), device=tensors[0].device, dtype=torch.float32)
    _reduce(tensors, ord, True, norms)
    return norms


def total_norm(
    tensors: list[torch.Tensor], ord: float, norm_of_norms: bool = False, max_norm: float | None = None,
    square: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 0-dim norm of all ``tensors`` together (``square``: its square, ord 2 only), and the
    clipping coefficient ``min(max_norm / (total + 1e-6), 1)`` when ``max_norm`` is given.
    ``norm_of_norms`` (ord 0): the number of tensors with a non-zero, as clip_grad_norm_."""
    tab, tensor_a, tensor_b = _reduce(tensors, ord, False)
    total = torch.empty((), device=tensor_a.device, dtype=torch.float32)
    coef = torch.empty_like(total) if max_norm is not None else None
    merge = foreach_norm_merge_config()
    kind = _kind(ord)
    launch(foreach_norm_total_kernel, (1,),
        tensor_a, tensor_b, total, coef if coef is not None else total, tab.n, float(ord),
        float(max_norm or 0.0), KIND=kind, IS_TWO=float(ord) == 2.0, SQUARE=square,
        NORM_OF_NORMS=norm_of_norms and kind == KIND_L0, WRITE_COEF=coef is not None, BLOCK=merge.block_c,
        **merge.launch_options(),
    )  # fmt: skip
    return total, coef


def _map(sources: list[torch.Tensor], dests: list[torch.Tensor], coef: torch.Tensor, mode: int) -> None:
    cfg = foreach_norm_config()
    tab = table(sources, cfg.item)
    dst = tab if dests is sources else table(dests, cfg.item)
    for (t0, _, i0, i1, aligned), out_group in zip(tab.groups, dst.groups):
        if i1 > i0:
            first = tab.order[t0]
            launch(foreach_map_kernel, (i1 - i0,),
                tab.offset, dst.offset, tab.numel, tab.item_tensor, tab.item_start, coef, sources[first],
                dests[first], i0, MODE=mode, ALIGNED=aligned, OUT_ALIGNED=out_group[4], CHUNKS=cfg.chunks,
                BLOCK=cfg.block_c, **cfg.launch_options(),
            )  # fmt: skip


def scale_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """``t *= coef`` for every tensor, in place (coef: fp32 0-dim device tensor)."""
    _map(tensors, tensors, coef.to(torch.float32), MAP_SCALE)


def penalty(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
    """fp32 0-dim ``sum |w|`` (kind "l1") or ``sum w^2`` ("l2") over every tensor."""
    return total_norm(tensors, 1.0 if kind == "l1" else 2.0, square=kind == "l2")[0]


def penalty_backward(tensors: list[torch.Tensor], grad: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """``grad * sign(w)`` ("l1") or ``grad * 2w`` ("l2") for every tensor, in its dtype."""
    grads = [torch.empty_like(t) for t in tensors]
    _map(tensors, grads, grad.to(torch.float32), MAP_SIGN if kind == "l1" else MAP_TWICE)
    return grads
