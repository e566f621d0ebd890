"""The benchmark suite: ``python -m fusedls.bench`` (or ``fusedls-bench``), and its Python API.

Each op registers its cases and providers in one module of this package (an
:class:`~fusedls.bench.core.OpBench` subclass instance named ``BENCH``), listed in
:data:`OP_MODULES`: a new op adds its module and one line here. :func:`run` runs the sweep of
the ops asked for and writes ``<op>.json``, ``<op>.csv`` and ``<op>.png`` under
``benchmarks/results/<device-slug>/``.

``import fusedls`` never imports this package.
"""

from __future__ import annotations

import importlib

OP_MODULES = {
    "cross_entropy": "fusedls.bench.cross_entropy",
    "dropout": "fusedls.bench.dropout",
    "dropout_add": "fusedls.bench.dropout_add",
    "dropout_add_rms_norm": "fusedls.bench.dropout_add_rms_norm",
}


def load_ops(names=None) -> dict:
    """``{name: OpBench}`` for ``names`` (default: every registered op)."""
    unknown = set(names or ()) - set(OP_MODULES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; registered: {sorted(OP_MODULES)}")
    return {name: importlib.import_module(OP_MODULES[name]).BENCH for name in names or OP_MODULES}


from .runner import BenchRun, run  # noqa: E402

__all__ = ["OP_MODULES", "BenchRun", "load_ops", "run"]
