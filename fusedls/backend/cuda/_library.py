"""The ``cuda`` backend's native library (``csrc/cuda``): where it is, building and loading it."""

from __future__ import annotations

from .. import _native
from . import _build

LIBRARY = _native.NativeLibrary(
    backend="cuda",
    namespace="fusedls_cuda",
    device_type="cuda",
    locate=_build.locate,
    blocker=_build.build_blocker,
    build=_build.jit_build,
    seconds=_build.JIT_SECONDS,
    precondition=_build.precondition,
)
