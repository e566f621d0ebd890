"""fusedls: fused GPU kernels for label-smoothing cross-entropy and friends.

Public surface: :func:`cross_entropy`, :mod:`fusedls.nn`, and backend selection
(:func:`backends`, :func:`set_backend`, :func:`use_backend`). Importing fusedls needs neither
triton nor a GPU nor a compiler.
"""

from . import nn
from ._backend import BackendInfo, backends, set_backend, use_backend
from .ops.cross_entropy import cross_entropy

__version__ = "0.1.0"

__all__ = ["BackendInfo", "backends", "cross_entropy", "nn", "set_backend", "use_backend", "__version__"]
