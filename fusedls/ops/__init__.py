"""The op layer: one module per public op, holding its public function, its autograd Function
and its custom ops (``cross_entropy``, ``linear_cross_entropy``, ``dropout``, ``dropout_norm``,
``vector_norm``, ``foreach_norm``, ``vocab_parallel_cross_entropy``), plus what several ops share
(``_checks``, ``_loss``, ``_custom_op``). Each op calls its backends through
``fusedls.backend.registry``. The public names are exported by ``fusedls`` itself; nothing is
re-exported here, so ``fusedls.ops.<op>`` always names the module."""
