"""Vocabulary-parallel losses: every rank of a ``torch.distributed`` group holds a contiguous
slice of the classes (tensor-parallel LM heads).

:func:`vocab_parallel_cross_entropy` (logits), :func:`vocab_parallel_linear_cross_entropy` (hidden
states and this rank's rows of the head, without the logits) and :func:`vocab_partition` (where
each rank's classes lie). Implemented in ``fusedls/ops/vocab_parallel_*.py``.
"""

from .ops.vocab_parallel_cross_entropy import vocab_parallel_cross_entropy
from .ops.vocab_parallel_group import VocabPartition, vocab_partition
from .ops.vocab_parallel_linear_cross_entropy import vocab_parallel_linear_cross_entropy

__all__ = ["VocabPartition", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_partition"]
