"""The ``cpp`` backend: fused C++ CPU kernels (``csrc/cpu``), one module per op here
(``cross_entropy.py``, ``dropout.py``, ``vector_norm.py``, ``foreach_norm.py``) each satisfying its op's Protocol
in ``fusedls/backend/protocols.py``.

This package only finds and loads the native library (:mod:`fusedls.backend.cpp._build` says how it
is built and which instruction-set variant is loaded); importing it loads nothing. fp64 inputs
never come here: they run eagerly (the eager fp64 path is the reference, and fp64 losses are
not a performance case).
"""

from __future__ import annotations

from . import cross_entropy, dropout, foreach_norm, vector_norm
from ._library import LIBRARY

status, unavailable_reason, load, ops = LIBRARY.status, LIBRARY.unavailable_reason, LIBRARY.load, LIBRARY.ops


def capability() -> str:
    """The instruction set of the loaded kernels: "DEFAULT", "AVX2" or "AVX512"."""
    return ops().capability()
