"""Peak memory of a call counted from the tensors it allocates: any device, the meta device too.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every ATen op run under it (the autograd
engine's backward ops included) and adds up the bytes of the storages those ops create while
they are alive; its ``peak`` is the largest total. It counts what a caching allocator would have
to hold (``torch.cuda.max_memory_allocated`` counts the same, rounded to its 512-byte blocks), but
it needs no GPU, and on the ``meta`` device no data and no arithmetic: the peak of a full
Llama-3 8B head (16k tokens x 4096 x 128256) takes seconds to count on a laptop, for torch's
``F.linear`` + ``F.cross_entropy`` and for any fusedls path whose ops run on meta tensors (the
eager backend).

How lifetimes are known: a storage's Python object is kept alive exactly as long as the storage
(torch's PyObject preservation), so a ``weakref.finalize`` on it fires when the memory is freed,
whichever tensor (a view, a copy saved for backward) held it last. Storages that exist before
the call (inputs, parameters) are never counted, nor are their views. Kernels run by Triton's CPU
interpreter pass their tensors through numpy, which this count does not follow: count triton
paths on meta tensors (:func:`triton_on_meta`), where no kernel runs.

    with LiveBytes() as live:
        loss = f(x); loss.backward()
    live.peak  # bytes
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it while they live; ``peak`` the maximum,
    ``current`` what is still alive (results the caller kept, ``.grad`` fields)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted, for storages made under the mode
        self._known = weakref.WeakSet()  # every storage seen, counted or not (inputs)

    def _release(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def _see(self, storage: torch.UntypedStorage, created: bool) -> None:
        key = id(storage)
        if storage in self._known:
            if key in self._sizes and storage.nbytes() != self._sizes[key]:  # resized (out= ops)
                self.current += storage.nbytes() - self._sizes[key]
                self._sizes[key] = storage.nbytes()
                self.peak = max(self.peak, self.current)
            return
        self._known.add(storage)
        if created:
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), created=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), created=True)
        return out


def peak_live_bytes(fn) -> int:
    """Peak bytes allocated and alive at once during ``fn()`` (see :class:`LiveBytes`)."""
    with LiveBytes() as live:
        fn()
    return live.peak


def _skipping_meta(run):
    def launch(self, *args, **kwargs):  # a launch with a meta tensor among its arguments does nothing
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args, *kwargs.values())):
            return None
        return run(self, *args, **kwargs)

    return launch


@contextlib.contextmanager
def triton_on_meta():
    """Lets the triton backend take ``meta`` tensors, for counting its memory at sizes no CPU
    could compute: its launchers run as on a GPU (they allocate their outputs and buffers; the
    tuning table and the tensor tables are built), but a kernel launched with meta tensors is not
    run (compiled or interpreted alike); launches on real tensors run as usual. For planning runs
    only; restored on exit."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ..backend import registry

    runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    reason = registry.triton_unavailable_reason
    for cls, run in runs.items():
        cls.run = _skipping_meta(run)
    registry.triton_unavailable_reason = lambda device=None: (
        "" if device is not None and device.type == "meta" else reason(device)
    )
    try:
        yield
    finally:
        for cls, run in runs.items():
            cls.run = run
        registry.triton_unavailable_reason = reason
