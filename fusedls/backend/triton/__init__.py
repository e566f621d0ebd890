"""The ``triton`` backend: the Triton kernels and their launchers, one module per op, each
satisfying its op's Protocol in ``fusedls/backend/protocols.py``; launch parameters in
``tuning.py``. Importing this package imports triton: the registry does it on first use only.
"""

from . import cross_entropy, dropout, foreach_norm, linear_cross_entropy, vector_norm, vocab_parallel_cross_entropy

__all__ = [
    "cross_entropy", "dropout", "foreach_norm", "linear_cross_entropy", "vector_norm", "vocab_parallel_cross_entropy",
]
