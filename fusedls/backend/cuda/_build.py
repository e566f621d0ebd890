"""Building the native CUDA library (``csrc/cuda``) of the ``cuda`` backend.

The kernels (``csrc/cuda/cross_entropy.cu``) need only the CUDA runtime: ``extern "C"``
launchers taking raw pointers, sizes and a ``cudaStream_t``. The torch binding
(``csrc/cuda/binding.cpp``) is compiled only on a machine with a CUDA build of torch, just in
time (``torch.utils.cpp_extension.load``, nvcc + ninja) on the first request of the backend,
for :data:`ARCHS`. CI compiles the ``.cu`` file alone with nvcc (no torch needed) to report
registers and spills: :mod:`tools.cuda_report` (``python -m tools.cuda_report`` prints
it; tests/test_csrc.py asserts 0 spill bytes).
"""

from __future__ import annotations

import os
import shutil

import torch

from .. import _native

SOURCES = ("cuda/binding.cpp", "cuda/cross_entropy.cu")
HEADERS = ("cuda/cross_entropy.cuh", "common/cross_entropy_args.h", "common/torch_binding.h")
KERNEL_SOURCE = "cuda/cross_entropy.cu"
ARCHS = ("80", "90a")  # A100, H100 (sm_90a: the arch-specific Hopper target)
NVCC_FLAGS = ("-O3", "-lineinfo")  # torch's JIT adds its own -std; the standalone compile says c++17
JIT_SECONDS = 120
NAME = "_lib_cuda"


def gencode_flags() -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]


def source_paths() -> list[str]:
    return [os.path.join(_native.CSRC, s) for s in SOURCES]


def nvcc() -> str | None:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, else PATH's."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_command(arch: str, output: str) -> list[str]:
    """nvcc compiling the kernels alone into a cubin for ``arch`` ("80", "90a"), printing
    ptxas's register / spill report (-Xptxas -v)."""
    return [
        nvcc() or "nvcc", *NVCC_FLAGS, "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
        "-o", output, os.path.join(_native.CSRC, KERNEL_SOURCE),
    ]  # fmt: skip


def _jit_dir() -> str:
    files = [os.path.join(_native.CSRC, rel) for rel in SOURCES + HEADERS]
    return _native.cache_dir("cuda", files, [*NVCC_FLAGS, *gencode_flags()])


def precondition() -> str:
    """Why the cuda backend cannot run in this process at all ("" when it can)."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (the cuda backend needs a CUDA build of torch and a GPU)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ""


def locate() -> str | None:
    path = os.path.join(_jit_dir(), NAME + ".so")
    return path if all(os.path.exists(p) for p in source_paths()) and os.path.exists(path) else None


def build_blocker() -> str:
    return _native.toolchain_blocker(source_paths(), nvcc() or "nvcc")


def jit_build() -> str:
    return _native.jit_build(
        "cuda backend", NAME, _jit_dir(), JIT_SECONDS, sources=source_paths(),
        extra_cflags=["-O3"], extra_cuda_cflags=[*NVCC_FLAGS, *gencode_flags()],
    )  # fmt: skip

