"""fusedls: fused GPU kernels for label-smoothing cross-entropy and friends.

Public surface: :func:`cross_entropy`; :func:`dropout`, :func:`dropout_add`,
:func:`dropout_add_rms_norm`, :func:`dropout_add_layer_norm`; :mod:`fusedls.nn`;
:mod:`fusedls.distributed` (vocabulary-parallel cross-entropy); backend selection
(:func:`backends`, :func:`set_backend`, :func:`use_backend`). Importing fusedls needs neither
triton nor a GPU nor a compiler.
"""

from . import distributed, nn
from ._backend import BackendInfo, backends, set_backend, use_backend
from .ops.cross_entropy import cross_entropy
from .ops.dropout import dropout, dropout_add, dropout_add_layer_norm, dropout_add_rms_norm

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "backends",
    "cross_entropy",
    "distributed",
    "dropout",
    "dropout_add",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "nn",
    "set_backend",
    "use_backend",
    "__version__",
]
