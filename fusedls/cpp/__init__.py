"""The ``cpp`` backend: fused C++ CPU kernels (``csrc/cpu``), one module per op here
(``cross_entropy.py``, ``vector_norm.py``, ``foreach_norm.py``) with the interface of
``fusedls/eager/<op>.py``.

This package only finds and loads the native library (:mod:`fusedls.cpp._build` says how it
is built and which instruction-set variant is loaded); importing it loads nothing. fp64 inputs
never come here: they run eagerly (the eager fp64 path is the reference, and fp64 losses are
not a performance case).
"""

from __future__ import annotations

from .. import _native
from . import _build

LIBRARY = _native.NativeLibrary(
    backend="cpp",
    namespace="fusedls_cpp",
    device_type="cpu",
    locate=_build.locate,
    blocker=_build.build_blocker,
    build=_build.jit_build,
    seconds=_build.JIT_SECONDS,
)
status, unavailable_reason, load, ops = LIBRARY.status, LIBRARY.unavailable_reason, LIBRARY.load, LIBRARY.ops


def capability() -> str:
    """The instruction set of the loaded kernels: "DEFAULT", "AVX2" or "AVX512"."""
    return ops().capability()
