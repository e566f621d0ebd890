"""pytest-benchmark suite, CPU: cross-entropy forward + backward of fusedls's eager and cpp backends against
torch eager ``nn.CrossEntropyLoss(label_smoothing=0.1)`` and ``torch.compile`` of it.

    pytest benchmarks --benchmark-only                        # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave   # also save it under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare    # compare with the last saved run

Not part of ``python -m pytest`` (pyproject's ``testpaths`` is ``tests``) and never fails on
speed; a test fails only if a fusedls result is wrong. The cases, providers, correctness check
and timed call are those of ``python -m fusedls.bench`` (``fusedls/bench/cross_entropy.py``):
each round restores the logits and clears the gradient untimed (pytest-benchmark's ``setup``).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.cross_entropy import BENCH  # noqa: E402
from fusedls.bench.suite import run_benchmark  # noqa: E402

CASES = [Case("fwd+bwd", dtype, 256, vocab) for dtype in ("fp32", "bf16") for vocab in (32000, 50257)]
PROVIDERS = {p.name: p for p in BENCH.providers()}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c.mode}-{c.dtype}-{c.rows}x{c.cols}")
def case_inputs(request):
    return request.param, BENCH.prepare(request.param, torch.device("cpu"))


NAMES = ["torch", "torch.compile", "fusedls/eager", "fusedls/eager+inplace", "fusedls/cpp", "fusedls/cpp+inplace"]


@pytest.mark.parametrize("name", NAMES)
def test_cross_entropy(benchmark, case_inputs, name):
    case, inputs = case_inputs
    why_not = PROVIDERS[name].why_not(case, torch.device("cpu"))
    if why_not:
        pytest.skip(why_not)
    run_benchmark(benchmark, BENCH, PROVIDERS[name], case, inputs)
