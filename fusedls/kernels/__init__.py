"""Triton kernels, one module per op (imported lazily: these modules import triton)."""
