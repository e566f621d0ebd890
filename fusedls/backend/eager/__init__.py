"""The ``eager`` backend: pure PyTorch, the kernels' math and interface, one module per op.

It runs on every device and dtype (fp64 always comes here) and is the reference the other
backends are tested against; each module satisfies its op's Protocol in
``fusedls/backend/protocols.py``.
"""

from . import cross_entropy, dropout, foreach_norm, linear_cross_entropy, vector_norm, vocab_parallel_cross_entropy

__all__ = [
    "cross_entropy", "dropout", "foreach_norm", "linear_cross_entropy", "vector_norm", "vocab_parallel_cross_entropy",
]
