"""pytest-benchmark suite, CPU: LM head + loss forward + backward, ``fusedls.linear_cross_entropy``
(eager backend, chunked) against the materialised ``F.cross_entropy(F.linear(h, W), t,
label_smoothing=0.1)`` and ``torch.compile`` of it. Cases, providers, check and timed call are those
of ``python -m fusedls.bench`` (``fusedls/bench/linear_cross_entropy.py``); peak memory is in the
``python -m fusedls.bench linear_cross_entropy`` report."""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.linear_cross_entropy import BENCH  # noqa: E402
from fusedls.bench.suite import run_benchmark  # noqa: E402

CASES = [Case("fwd+bwd", "fp32", 512, 32000)]
PROVIDERS = {p.name: p for p in BENCH.providers()}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c.mode}-{c.dtype}-{c.rows}x{c.cols}")
def case_inputs(request):
    return request.param, BENCH.prepare(request.param, torch.device("cpu"))


@pytest.mark.parametrize("name", ["torch", "torch.compile", "fusedls/eager", "fusedls/eager+vocab"])
def test_linear_cross_entropy(benchmark, case_inputs, name):
    case, inputs = case_inputs
    run_benchmark(benchmark, BENCH, PROVIDERS[name], case, inputs)
