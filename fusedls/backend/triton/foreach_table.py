"""The tensor table of the multi-tensor kernels (``fusedls/backend/triton/foreach_norm.py``): a list of
tensors described by one int64 device tensor, built on the host.

The launchers never pass tensors one by one: the ``n`` tensors of a call (kept in dtype groups:
a pointer's element type is a compile-time property, so each dtype is one launch) are described
by one int64 device tensor (:class:`Table`, copied with ``non_blocking=True`` from pinned memory
and cached by the tuple of (data_ptr, numel, dtype), so a training loop that clips the same
gradients every step builds it once):

  offset[t]      where tensor t starts: ``(data_ptr(t) - data_ptr(base)) / element_size``, in
                 elements from the first tensor of its dtype group (the launch's ``like_ptr``)
  numel[t]       its number of elements
  out_index[t]   where its per-tensor norm goes in the caller's order
  first[t]       its first work item (first[n] = the number of items)
  item_tensor[i] the tensor of work item i, item_start[i] its first element

Why offsets and not raw addresses: ``tl.load(table + t).to(tl.pointer_type(tl.bfloat16))`` works
(interpreter and compiler) but an integer-to-pointer cast carries no alignment, so every load is
scalar (2 bytes for bf16: far from the bandwidth). ``like_ptr + offset`` keeps like_ptr's
16-byte alignment (triton's launcher specialises it) and, when every tensor of the group is
16-byte aligned (``ALIGNED``), ``tl.multiple_of(offset, 16 bytes)`` tells the compiler so: full
items then load 16 bytes per instruction; a tensor's tail (``start + CHUNKS * BLOCK > numel``)
takes a masked branch. A group with an unaligned tensor (a view at an odd offset) runs unaligned
(scalar loads, still correct). The interpreter dereferences ``like_ptr + offset`` as a raw
address too, so the CPU tests run exactly the GPU path.
"""

from __future__ import annotations

import dataclasses
import operator

import torch


@dataclasses.dataclass(frozen=True)
class Table:
    """The device description of a list of tensors in dtype groups (see the module docstring)."""

    data: torch.Tensor  # int64: offset (n), numel (n), out_index (n), first (n + 1), item_tensor, item_start
    n: int
    items: int
    groups: tuple  # (first tensor, end tensor, first item, end item, aligned) per dtype group
    order: tuple  # the caller's index of each table entry

    def _part(self, k: int) -> torch.Tensor:
        n, items = self.n, self.items
        bounds = (0, n, 2 * n, 3 * n, 4 * n + 1, 4 * n + 1 + items, 4 * n + 1 + 2 * items)
        return self.data[bounds[k] : bounds[k + 1]]

    # the columns, views of ``data``
    offset = property(lambda self: self._part(0))
    numel = property(lambda self: self._part(1))
    out_index = property(lambda self: self._part(2))
    first = property(lambda self: self._part(3))
    item_tensor = property(lambda self: self._part(4))
    item_start = property(lambda self: self._part(5))


_CACHE: dict[tuple, Table] = {}
_DATA_PTR, _NUMEL, _DTYPE = torch.Tensor.data_ptr, torch.Tensor.numel, operator.attrgetter("dtype")
CACHE_SIZE = 8  # tables kept (a training loop needs one or two: the gradients, the weights)


def dtype_groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def table(tensors: list[torch.Tensor], item: int) -> Table:
    """The (cached) table of ``tensors`` in work items of ``item`` elements (CHUNKS * BLOCK): its
    content is a function of the key alone. Tensors of the same dtypes in the same order
    (gradients made by ``empty_like``) get the same groups."""
    key = (tensors[0].device, item, tuple(map(_DATA_PTR, tensors)), tuple(map(_NUMEL, tensors)),
           tuple(map(_DTYPE, tensors)))  # fmt: skip
    found = _CACHE.get(key)
    if found is None:
        found = _build(tensors, [i for g in dtype_groups(tensors) for i in g], item)
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = found
    return found


def _build(tensors: list[torch.Tensor], order: list[int], item: int) -> Table:
    ordered = [tensors[i] for i in order]
    n = len(ordered)
    numel = torch.tensor([t.numel() for t in ordered], dtype=torch.int64)
    items = (numel + item - 1) // item
    first = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(items, 0, out=first[1:])
    item_tensor = torch.repeat_interleave(torch.arange(n), items)
    item_start = (torch.arange(len(item_tensor)) - first[item_tensor]) * item
    groups, start, offset = [], 0, []
    for g in dtype_groups(ordered):
        end = start + len(g)
        base = ordered[start]
        offset += [(ordered[i].data_ptr() - base.data_ptr()) // base.element_size() for i in range(start, end)]
        aligned = all(ordered[i].data_ptr() % 16 == 0 for i in range(start, end))
        groups.append((start, end, int(first[start]), int(first[end]), aligned))
        start = end
    columns = [torch.tensor(offset, dtype=torch.int64), numel, torch.tensor(order, dtype=torch.int64), first]
    host = torch.cat(columns + [item_tensor, item_start])
    device = tensors[0].device
    if device.type == "cuda":  # an asynchronous copy: no host synchronisation
        host = host.pin_memory()
    data = host.to(device, non_blocking=True)
    return Table(data, n, len(item_tensor), tuple(groups), tuple(order))
