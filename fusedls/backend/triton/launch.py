"""Launching the Triton kernels without the JIT's per-call work.

``kernel[grid](*args, **constexprs)`` runs triton's JIT dispatcher on every call: it binds the
arguments, specialises each one (dtype, 16-byte alignment, value 1, divisibility by 16), builds a
cache key string, looks the compiled kernel up, checks the globals it captured and builds launch
metadata for hooks: 40-100 us of host time per launch on triton 3.6, more than many of these
kernels take on the GPU. :func:`launch` keeps, per kernel, the compiled kernel of each
specialisation under a key of its own (:func:`specialisation`: the same distinctions triton makes,
or finer) and calls the compiled kernel's launcher directly on the current device and stream. The
first call of a specialisation goes through the JIT (which compiles it) and fills the cache.

The direct launch is used when the kernel is a compiled ``JITFunction`` (not under
``TRITON_INTERPRET=1``), the installed triton has the launcher API of triton 3.4-3.9
(``CompiledKernel.run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *args)``) and no launch hook is registered (profilers that register one get
the JIT's path and their metadata); otherwise every call is the ordinary ``kernel[grid](...)``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton

try:
    from triton import knobs as _knobs
except ImportError:  # a triton without knobs: no direct launch
    _knobs = None

_I32 = (-(1 << 31), 1 << 31)


def specialisation(value: Any) -> Any:
    """What a launch argument contributes to the key: tensors by dtype and 16-byte alignment,
    ints by value 1, width (i32 / i64 / u64) and divisibility by 16, bools by value, floats by
    type alone (triton specialises none of them further), anything else (None, constexprs) by
    value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if value == 1:
            return 1
        width = 0 if _I32[0] <= value < _I32[1] else 2 if value >= 1 << 63 else 1
        return width, value % 16 == 0
    if isinstance(value, float):
        return float
    return value


class _Kernel:
    """One kernel's compiled specialisations and the order of its parameters."""

    def __init__(self, fn):
        self.direct = _direct_launch_possible(fn)
        self.compiled: dict[tuple, Any] = {}
        if self.direct:
            self.names = tuple(fn.arg_names)
            self.defaults = {p.name: p.default for p in fn.params if p.default is not inspect.Parameter.empty}

    def values(self, args: tuple, kwargs: dict) -> list:
        """Every parameter's value in signature order (constexprs included, as the launcher wants)."""
        tail = [kwargs[name] if name in kwargs else self.defaults[name] for name in self.names[len(args):]]
        return [*args, *tail]


def _direct_launch_possible(fn) -> bool:
    if _knobs is None or not isinstance(fn, triton.runtime.JITFunction) or not torch.cuda.is_available():
        return False
    compiled = getattr(triton.compiler, "CompiledKernel", None)
    return compiled is not None and all(hasattr(compiled, name) for name in ("run", "launch_metadata"))


def _hooks_registered() -> bool:
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


_KERNELS: dict[Any, _Kernel] = {}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # launch options: part of the key, not parameters


def launch(fn, grid: tuple, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``: every runtime argument positional, constexprs and launch
    options (``num_warps``, ``maxnreg``, ...) by keyword (their values are the key as they are);
    see the module docstring."""
    kernel = _KERNELS.get(fn)
    if kernel is None:
        kernel = _KERNELS[fn] = _Kernel(fn)
    if not kernel.direct or _hooks_registered():
        fn[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    key = (device, *map(specialisation, args), *kwargs.items())
    compiled = kernel.compiled.get(key)
    if compiled is None:  # the JIT compiles (or finds) it and launches it this once
        kernel.compiled[key] = fn[grid](*args, **kwargs)
        return
    for option in _OPTIONS:  # the compiled kernel carries them
        kwargs.pop(option, None)
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_y, grid_z, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *kernel.values(args, kwargs))  # fmt: skip


_RESIDENT: dict[tuple, int] = {}
REGISTERS_PER_SM = 65536  # every CUDA device from sm_50 on
BLOCKS_PER_SM = 32  # the most programs an SM holds (sm_80, sm_90)


def resident_programs(fn, *args, **kwargs) -> int:
    """How many programs of ``fn`` (the specialisation ``launch(fn, grid, *args, **kwargs)``
    would run) the current device holds at once: its SMs times the programs one SM holds by
    registers (allocated 8 a thread at a time), shared memory, threads and its block limit.
    Compiles the kernel without launching it (triton's warmup) the first time; cached."""
    device = torch.cuda.current_device()
    key = (fn, device, *map(specialisation, args), *kwargs.items())
    programs = _RESIDENT.get(key)
    if programs is None:
        compiled = fn.warmup(*args, grid=(1,), **kwargs)
        if getattr(compiled, "n_regs", None) is None or compiled.module is None:
            compiled._init_handles()  # loads the binary: ptxas's register count
        props = torch.cuda.get_device_properties(device)
        threads = 32 * compiled.metadata.num_warps
        regs = -(-max(compiled.n_regs, 1) // 8) * 8
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        per_sm = min(
            REGISTERS_PER_SM // (regs * threads),
            props.max_threads_per_multi_processor // threads,
            props.shared_memory_per_multiprocessor // (shared + 1024) if shared else BLOCKS_PER_SM,
            BLOCKS_PER_SM,
        )  # fmt: skip
        programs = _RESIDENT[key] = props.multi_processor_count * per_sm
    return programs
