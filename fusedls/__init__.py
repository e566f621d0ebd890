"""fusedls: fused GPU kernels for label-smoothing cross-entropy and friends.

Public surface: :func:`cross_entropy` (options: z-loss, soft-capping, lse, token accuracy;
:class:`CrossEntropyResult`), :func:`linear_cross_entropy` (torch's ``F.linear_cross_entropy``: LM
head + loss without the logits); :func:`dropout`, :func:`dropout_add`,
:func:`dropout_add_rms_norm`, :func:`dropout_add_layer_norm`; :func:`vector_norm` (without fp32
overflow / underflow), :func:`foreach_norm`, :func:`total_norm`,
:func:`clip_grad_norm_`, :func:`l1_penalty`, :func:`l2_penalty`, :func:`regularization_penalty`;
:mod:`fusedls.nn`;
:mod:`fusedls.distributed` (vocabulary-parallel cross-entropy); backend selection
(:func:`backends`, :func:`set_backend`, :func:`use_backend`). Importing fusedls needs neither
triton nor a GPU nor a compiler.
"""

from . import distributed, nn
from .backend.registry import BackendInfo, backends, set_backend, use_backend
from .ops._loss import CrossEntropyResult
from .ops.cross_entropy import cross_entropy
from .ops.dropout import dropout, dropout_add
from .ops.dropout_norm import dropout_add_layer_norm, dropout_add_rms_norm
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.foreach_norm import (
    clip_grad_norm_, foreach_norm, l1_penalty, l2_penalty, regularization_penalty, total_norm,
)  # fmt: skip
from .ops.vector_norm import vector_norm

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "backends",
    "cross_entropy",
    "CrossEntropyResult",
    "distributed",
    "dropout",
    "dropout_add",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "linear_cross_entropy",
    "nn",
    "set_backend",
    "use_backend",
    "clip_grad_norm_",
    "foreach_norm",
    "l1_penalty",
    "l2_penalty",
    "regularization_penalty",
    "total_norm",
    "vector_norm",
    "__version__",
]
