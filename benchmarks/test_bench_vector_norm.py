"""pytest-benchmark suite, CPU: ``fusedls.vector_norm`` (fusedls's eager backend) against
``torch.linalg.vector_norm`` eager and under ``torch.compile``, ord 2: rows along dim=-1, and a
whole tensor (dim=None), forward and forward + backward.

    pytest benchmarks/test_bench_vector_norm.py --benchmark-only

Not part of ``python -m pytest`` and never fails on speed; a test fails only if a fusedls result
is wrong. Cases, providers, check and timed call are those of ``python -m fusedls.bench``
(``fusedls/bench/vector_norm.py``).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.vector_norm import BENCH  # noqa: E402
from fusedls.bench.suite import run_benchmark  # noqa: E402

CASES = [Case("fwd", "fp32", 1024, 2048), Case("fwd+bwd", "fp32", 1024, 2048), Case("fwd", "fp32", 1, 1 << 22)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c.mode}-{c.dtype}-{c.rows}x{c.cols}")
def case_inputs(request):
    return request.param, BENCH.prepare(request.param, torch.device("cpu"))


@pytest.mark.parametrize("name", ["torch", "torch.compile", "fusedls/eager"])
def test_vector_norm(benchmark, case_inputs, name):
    case, inputs = case_inputs
    run_benchmark(benchmark, BENCH, {p.name: p for p in BENCH.providers()}[name], case, inputs)
