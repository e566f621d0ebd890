"""Public functions, autograd Functions and custom ops, one module per op (``cross_entropy``,
``dropout``). The public names are exported by ``fusedls`` itself; nothing is re-exported here,
so ``fusedls.ops.<op>`` always names the module."""
