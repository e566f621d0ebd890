"""pytest-benchmark suite, CPU: ``fusedls.foreach_norm``, ``clip_grad_norm_`` and the L1/L2
penalties (forward + backward) of fusedls's eager backend against ``torch._foreach_norm``,
``torch.nn.utils.clip_grad_norm_(foreach=True)`` and the Python-loop penalties, on a small
Llama-like parameter list (2 layers, d = 256).

    pytest benchmarks/test_bench_foreach_norm.py --benchmark-only

Not part of ``python -m pytest`` and never fails on speed; a test fails only if a fusedls result
is wrong. Cases, providers, check and timed call are those of ``python -m fusedls.bench``
(``fusedls/bench/foreach_norm.py``): clipping restores the gradients before each round, untimed.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.foreach_norm import (  # noqa: E402
    CLIP_GRAD_NORM, CLIP_GRAD_NORM_WITHIN, FOREACH_NORM, L1_PENALTY, L2_PENALTY,
)
from fusedls.bench.suite import run_benchmark  # noqa: E402

BENCHES = [FOREACH_NORM, CLIP_GRAD_NORM, CLIP_GRAD_NORM_WITHIN, L2_PENALTY, L1_PENALTY]
CASES = [(b, Case(b.mode, "fp32", 2, 256)) for b in BENCHES]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0].name}-{c[1].dtype}-{c[1].rows}x{c[1].cols}")
def case_inputs(request):
    bench, case = request.param
    return bench, case, bench.prepare(case, torch.device("cpu"))


@pytest.mark.parametrize("name", ["torch", "fusedls/eager"])
def test_foreach_norm(benchmark, case_inputs, name):
    bench, case, inputs = case_inputs
    run_benchmark(benchmark, bench, {p.name: p for p in bench.providers()}[name], case, inputs)
