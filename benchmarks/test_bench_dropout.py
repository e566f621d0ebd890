"""pytest-benchmark suite, CPU: forward + backward of ``fusedls.dropout``, ``dropout_add`` and
``dropout_add_rms_norm`` (fusedls's eager backend) against the torch compositions
(``F.dropout``, ``residual + F.dropout(x)``, ``F.rms_norm(residual + F.dropout(x))``) eager and
under ``torch.compile``, p = 0.1.

    pytest benchmarks/test_bench_dropout.py --benchmark-only

Not part of ``python -m pytest`` and never fails on speed; a test fails only if a fusedls result
is wrong. Cases, providers, check and timed call are those of ``python -m fusedls.bench``
(``fusedls/bench/dropout.py``): each round clears the gradients untimed (pytest-benchmark's ``setup``).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.dropout import OPS  # noqa: E402
from fusedls.bench.suite import run_benchmark  # noqa: E402

CASES = [(op, Case("fwd+bwd", "fp32", 256, 2048)) for op in OPS]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1].mode}-{c[1].dtype}-{c[1].rows}x{c[1].cols}")
def case_inputs(request):
    op, case = request.param
    return OPS[op], case, OPS[op].prepare(case, torch.device("cpu"))


@pytest.mark.parametrize("name", ["torch", "torch.compile", "fusedls/eager"])
def test_dropout(benchmark, case_inputs, name):
    bench, case, inputs = case_inputs
    run_benchmark(benchmark, bench, {p.name: p for p in bench.providers()}[name], case, inputs)
