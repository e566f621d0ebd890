"""Building and loading the native CPU library (``csrc/cpu``) of the ``cpp`` backend.

The kernels use ``at::vec::Vectorized``, which is a real SIMD register only when
``CPU_CAPABILITY_AVX512`` / ``CPU_CAPABILITY_AVX2`` is defined at compile time (scalar loops
otherwise). So the library is built in several variants, each with its own instruction-set
flags (:data:`VARIANTS`), and the one matching torch's CPU capability
(``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``) is loaded:
never a variant the CPU cannot run, and never two in one process.

Where a variant comes from, in order:

1. ahead of time: ``pip install --no-build-isolation -e .`` builds every variant into
   ``fusedls/backend/cpp/_lib_<variant>*.so`` when torch and a C++ compiler are present (setup.py;
   ``FUSEDLS_NO_EXTENSIONS=1`` skips it);
2. the just-in-time cache (``$FUSEDLS_CACHE_DIR`` or ``~/.cache/fusedls``), filled by
3. a just-in-time build (``torch.utils.cpp_extension.load``, ninja) of the one variant this
   machine needs, from a source checkout, when the backend is first *requested*
   (``FUSEDLS_BACKEND=cpp``, ``use_backend("cpp")`` or :func:`load`) — announced on stderr with
   its expected duration, never silently inside a loss call. ``auto`` only uses a library that
   is already built. ``FUSEDLS_NO_EXTENSIONS=1`` forbids this build too.
"""

from __future__ import annotations

import glob
import os
import platform

import torch

from .. import _native

SOURCES = ("cpu/binding.cpp", "cpu/cross_entropy.cpp", "cpu/vector_norm.cpp", "cpu/foreach_norm.cpp", "cpu/dropout.cpp")
HEADERS = (
    "cpu/cross_entropy.h", "cpu/vector_norm.h", "cpu/foreach_norm.h", "cpu/dropout.h", "cpu/vec_io.h",
    "common/cross_entropy_args.h", "common/torch_binding.h",
)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Instruction-set flags of each variant (x86-64); other machines get DEFAULT only.
VARIANTS = {
    "DEFAULT": (),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"),
}
# -fopenmp: at::parallel_for is OpenMP code inlined into the caller; without it, it runs on one
# thread. The library then needs libgomp.so.1, which torch has already loaded (its own copy).
# -ffp-contract=off: no multiply-add the source does not write (at::vec::fmadd stays one), so every
# instruction-set variant rounds alike and a difference of products such as sum_w * lse - sum_wx
# (a probability row's loss) is not left with the rounding of one product when it cancels.
COMMON_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
LINK_FLAGS = ("-fopenmp",)
JIT_SECONDS = 60  # what a JIT build takes on 2 busy cores (told to the user beforehand)


def variants_here() -> tuple[str, ...]:
    """The variants this platform can build (all on x86-64, DEFAULT elsewhere)."""
    return tuple(VARIANTS) if platform.machine().lower() in ("x86_64", "amd64") else ("DEFAULT",)


def compile_flags(variant: str) -> list[str]:
    """Compiler flags of ``variant``: ATen's own defines for the capability, plus ours."""
    flags = [*COMMON_FLAGS, *VARIANTS[variant]]
    if variant != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY={variant}", f"-DCPU_CAPABILITY_{variant}"]
    return flags


def wanted_variant() -> str:
    """The variant for this process: torch's CPU capability if built for, else the next one down."""
    capability = torch.backends.cpu.get_cpu_capability()
    order = [v for v in ("AVX512", "AVX2", "DEFAULT") if v in variants_here()]
    return order[order.index(capability):][0] if capability in order else "DEFAULT"


def library_name(variant: str) -> str:
    return f"_lib_{variant.lower()}"


def source_paths() -> list[str]:
    return [os.path.join(_native.CSRC, s) for s in SOURCES]


def _jit_dir(variant: str) -> str:
    files = [os.path.join(_native.CSRC, rel) for rel in SOURCES + HEADERS]
    return _native.cache_dir(f"cpp-{variant.lower()}", files, compile_flags(variant))


def prebuilt(variant: str) -> str | None:
    """The library ``pip install`` built for ``variant`` (in this package), or None; in a
    source checkout, None also when a source is newer than it (an editable install whose C++
    was edited since: the JIT cache, rebuilt from the current sources, is used instead)."""
    found = sorted(glob.glob(os.path.join(PACKAGE_DIR, library_name(variant) + "*.so")))
    if not found:
        return None
    sources = [os.path.join(_native.CSRC, rel) for rel in SOURCES + HEADERS]
    newest = max((os.path.getmtime(p) for p in sources if os.path.exists(p)), default=0.0)
    return found[0] if os.path.getmtime(found[0]) >= newest else None


def cached(variant: str) -> str | None:
    """The JIT-built library of ``variant`` for the current sources, or None."""
    if not all(os.path.exists(p) for p in source_paths()):
        return None
    path = os.path.join(_jit_dir(variant), library_name(variant) + ".so")
    return path if os.path.exists(path) else None


def locate() -> str | None:
    """The built library of this machine's variant (prebuilt first), or None."""
    variant = wanted_variant()
    return prebuilt(variant) or cached(variant)


def build_blocker() -> str:
    """Why a JIT build cannot run here ("" when it can)."""
    return _native.toolchain_blocker(source_paths(), os.environ.get("CXX", "c++"))


def jit_build() -> str:
    """Compiles this machine's variant into the cache (announced on stderr) and loads it."""
    variant = wanted_variant()
    return _native.jit_build(
        f"cpp backend ({variant})", library_name(variant), _jit_dir(variant), JIT_SECONDS,
        sources=source_paths(), extra_cflags=compile_flags(variant), extra_ldflags=list(LINK_FLAGS),
    )  # fmt: skip
