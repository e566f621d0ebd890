"""Eager (pure PyTorch) backend: the kernels' math and interface, one module per op."""
