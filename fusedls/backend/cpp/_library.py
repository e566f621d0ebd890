"""The ``cpp`` backend's native library (``csrc/cpu``): where it is, building and loading it."""

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
