"""The benchmark suite: ``python -m fusedls.bench`` (or ``fusedls-bench``), and its Python API.

Each op registers its cases and providers in one module of this package (an
:class:`~fusedls.bench.core.OpBench` subclass instance, ``BENCH`` unless named after a colon),
listed in :data:`OP_MODULES`: a new op adds its module and one line here; variants of one op
(dropout, dropout_add, ...) share a module. :func:`run` runs the sweep of
the ops asked for and writes ``<op>.json``, ``<op>.csv`` and ``<op>.png`` under
``benchmarks/results/<device-slug>/``.

``import fusedls`` never imports this package.
"""

from __future__ import annotations

import importlib

OP_MODULES = {
    "cross_entropy": "fusedls.bench.cross_entropy",
    "dropout": "fusedls.bench.dropout",
    "dropout_add": "fusedls.bench.dropout:DROPOUT_ADD",
    "dropout_add_rms_norm": "fusedls.bench.dropout:DROPOUT_ADD_RMS_NORM",
    "linear_cross_entropy": "fusedls.bench.linear_cross_entropy",
    "foreach_norm": "fusedls.bench.foreach_norm",
    "foreach_norm_act": "fusedls.bench.foreach_norm:FOREACH_NORM_ACT",
    "clip_grad_norm": "fusedls.bench.foreach_norm:CLIP_GRAD_NORM",
    "clip_grad_norm_within": "fusedls.bench.foreach_norm:CLIP_GRAD_NORM_WITHIN",
    "l2_penalty": "fusedls.bench.foreach_norm:L2_PENALTY",
    "l1_penalty": "fusedls.bench.foreach_norm:L1_PENALTY",
    "vector_norm": "fusedls.bench.vector_norm",
    "vocab_parallel_cross_entropy": "fusedls.bench.vocab_parallel_cross_entropy",
    "overhead": "fusedls.bench.overhead",
    "train_step": "fusedls.bench.train_step",
}


# Run only when asked for by --op: they measure something else than an op's sweep (the host path
# of every op at once; whole training steps).
NOT_IN_DEFAULT_RUN = {"overhead", "train_step"}


def load_ops(names=None) -> dict:
    """``{name: OpBench}`` for ``names`` (default: every registered op but NOT_IN_DEFAULT_RUN)."""
    unknown = set(names or ()) - set(OP_MODULES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; registered: {sorted(OP_MODULES)}")
    found = {}
    for name in names or [op for op in OP_MODULES if op not in NOT_IN_DEFAULT_RUN]:
        module, _, attribute = OP_MODULES[name].partition(":")
        found[name] = getattr(importlib.import_module(module), attribute or "BENCH")
    return found


from .runner import BenchRun, run  # noqa: E402

__all__ = ["NOT_IN_DEFAULT_RUN", "OP_MODULES", "BenchRun", "load_ops", "run"]
