"""Public functions and autograd Functions, one module per op."""

from .cross_entropy import CrossEntropyFunction, cross_entropy

__all__ = ["CrossEntropyFunction", "cross_entropy"]
