"""The ``cuda`` backend: CUDA C++ kernels (``csrc/cuda``), one module per op here
(``fusedls/backend/cuda/cross_entropy.py``) satisfying the ``CrossEntropyBackend``
Protocol of ``fusedls/backend/protocols.py``.

It needs a CUDA build of torch and a GPU; the library is compiled on the first request of
the backend (:mod:`fusedls.backend.cuda._build`). Importing this package loads nothing.
"""

from __future__ import annotations

from . import cross_entropy
from ._library import LIBRARY

status, unavailable_reason, load, ops = LIBRARY.status, LIBRARY.unavailable_reason, LIBRARY.load, LIBRARY.ops

