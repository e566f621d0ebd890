"""The ``cuda`` backend: CUDA C++ kernels (``csrc/cuda``), one module per op here
(``fusedls/cuda/cross_entropy.py``) with the interface of ``fusedls/eager/<op>.py``.

It needs a CUDA build of torch and a GPU; the library is compiled on the first request of
the backend (:mod:`fusedls.cuda._build`). Importing this package loads nothing.
"""

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
status, unavailable_reason, load, ops = LIBRARY.status, LIBRARY.unavailable_reason, LIBRARY.load, LIBRARY.ops
