"""Launch parameters of the Triton kernels, kept apart from the kernels themselves.

Every row of the logits is swept in chunks of ``block_c`` classes. The chunk is capped so the
per-thread working set stays in registers (``python -m fusedls.aot`` checks that no
specialisation spills): at the cap one thread holds ``block_c / (32 * num_warps)`` elements.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_c: int  # classes per chunk (a power of two)
    num_warps: int

    @property
    def maxnreg(self) -> int:
        """Register cap: all a program may use with one program per SM. Without it ptxas
        aims at two programs per SM and spills a few bytes at 64 registers (seen with
        num_warps 8 and 16 on sm_90a, triton 3.6 and 3.9)."""
        return min(255, 65536 // (32 * self.num_warps))

    def launch_options(self) -> dict:
        """Keyword arguments of a kernel launch (and of triton.compile in fusedls.aot)."""
        return dict(num_warps=self.num_warps, maxnreg=self.maxnreg)


# Largest chunk per element size in bytes. Tests lower it to make the chunk loop run many
# times on small vocabularies under the interpreter.
CROSS_ENTROPY_MAX_BLOCK = {2: 8192, 4: 4096}

# (largest chunk, warps) in increasing chunk order: the first row whose chunk fits is used.
_CROSS_ENTROPY_WARPS = ((1024, 4), (4096, 8), (8192, 16))


def cross_entropy_config(n_cols: int, element_size: int) -> LaunchConfig:
    """Chunk and warps for a row of ``n_cols`` classes of ``element_size``-byte logits."""
    cap = CROSS_ENTROPY_MAX_BLOCK.get(element_size, CROSS_ENTROPY_MAX_BLOCK[4])
    block = max(16, min(triton.next_power_of_2(max(n_cols, 1)), cap))
    warps = next(w for limit, w in _CROSS_ENTROPY_WARPS if block <= limit or limit == _CROSS_ENTROPY_WARPS[-1][0])
    return LaunchConfig(block_c=block, num_warps=warps)


# The forward kernel that also writes the gradient sweeps each row twice; the second sweep
# must find the row in L2. Its programs loop over rows, and their number is capped so that the
# rows in flight (one per program) take at most this fraction of L2: an H100 (50 MB L2, 132
# SMs) keeps 132 rows of 128k bf16 logits (34 MB) in flight, one per SM.
L2_FRACTION = 0.7
MAX_PROGRAMS_PER_SM = 8
# Programs off CUDA (the interpreter): None is one per row; tests set a small number so each
# program loops over several rows.
INTERPRETER_PROGRAMS: int | None = None


@functools.lru_cache(maxsize=None)
def _sm_count_and_l2_bytes(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)


def cross_entropy_programs(device: torch.device, row_bytes: int, n_rows: int) -> int:
    """Programs for the forward kernel with the gradient: rows in flight that fit in L2, at
    least one per SM, at most n_rows. Off CUDA (the interpreter) see INTERPRETER_PROGRAMS."""
    if device.type != "cuda":
        return min(n_rows, INTERPRETER_PROGRAMS or n_rows)
    sms, l2_bytes = _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    per_sm = int(L2_FRACTION * l2_bytes) // (sms * max(row_bytes, 1))
    return max(1, min(n_rows, sms * max(1, min(per_sm, MAX_PROGRAMS_PER_SM))))


# ----------------------------------------------------------------------------------------------
# vocab_parallel_cross_entropy (fusedls/kernels/vocab_parallel_cross_entropy.py)
# ----------------------------------------------------------------------------------------------


# Rows per launch: a chunk of rows holds about this many logits. The kernels need no
# temporaries, but the linear variant materialises each chunk's logits (and, in backward, an
# fp32 gradient chunk): 16M elements are 32 MiB of bf16 logits, and ~1k rows of a 16k-class slice
# (8 programs per SM on an H100). Tests lower it to run the chunk loop.
VOCAB_PARALLEL_CHUNK_ELEMENTS = 1 << 24


def vocab_parallel_config(n_cols: int, element_size: int) -> LaunchConfig:
    """Chunk and warps of the vocabulary-parallel kernels: they sweep a row of a rank's classes
    as the cross-entropy kernels do, with the same per-thread working set, so the same table."""
    return cross_entropy_config(n_cols, element_size)


# ----------------------------------------------------------------------------------------------
# dropout (fusedls/kernels/dropout.py)
# ----------------------------------------------------------------------------------------------

# Elementwise dropout / dropout_add: elements per program and warps (8 elements per thread).
DROPOUT_BLOCK = 2048
DROPOUT_WARPS = 8


def dropout_config() -> LaunchConfig:
    """Block (``block_c``: elements per program) and warps of ``dropout_kernel``."""
    return LaunchConfig(block_c=DROPOUT_BLOCK, num_warps=DROPOUT_WARPS)


# dropout + add + norm keep a whole row in registers; longer rows run on the eager backend. Per
# element size in bytes: fp32 LayerNorm backward (dweight and dbias partial sums in registers
# besides the row) spills a few bytes at 8192 (16 warps, 128 registers; sm_80 and sm_90a).
DROPOUT_NORM_MAX_N = {2: 8192, 4: 4096}
# (largest row block, warps): the first whose block fits is used (at most 32 elements/thread).
_DROPOUT_NORM_WARPS = ((256, 1), (512, 2), (1024, 4), (2048, 8), (8192, 16))
# Programs of the backward kernel (each loops over rows and keeps fp32 partial sums of dweight
# and dbias): this many per SM; off CUDA (the interpreter) DROPOUT_NORM_INTERPRETER_PROGRAMS.
DROPOUT_NORM_PROGRAMS_PER_SM = 4
DROPOUT_NORM_INTERPRETER_PROGRAMS = 3


def dropout_norm_config(n_cols: int) -> LaunchConfig:
    """Row block (``block_c``, a power of two >= n_cols) and warps of the norm kernels."""
    block = max(16, triton.next_power_of_2(max(n_cols, 1)))
    warps = next((w for limit, w in _DROPOUT_NORM_WARPS if block <= limit), _DROPOUT_NORM_WARPS[-1][1])
    return LaunchConfig(block_c=block, num_warps=warps)


def dropout_norm_programs(device: torch.device, n_rows: int) -> int:
    """Programs of the norm backward kernel: a few per SM, at most one per row."""
    if device.type != "cuda":
        return max(1, min(n_rows, DROPOUT_NORM_INTERPRETER_PROGRAMS))
    sms, _ = _sm_count_and_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_rows, sms * DROPOUT_NORM_PROGRAMS_PER_SM))
