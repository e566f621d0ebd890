"""pytest-benchmark suite, CPU: ``fusedls.distributed.vocab_parallel_cross_entropy`` on a process
group of one rank (gloo) against torch eager and ``fusedls.cross_entropy``, forward + backward.

    pytest benchmarks/test_bench_vocab_parallel_cross_entropy.py --benchmark-only

The cases, providers, check and timed call are those of ``python -m fusedls.bench --op
vocab_parallel_cross_entropy`` (``fusedls/bench/vocab_parallel_cross_entropy.py``); a test fails
only if a fusedls result is wrong, never on speed.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fusedls.bench.core import Case  # noqa: E402
from fusedls.bench.vocab_parallel_cross_entropy import BENCH, LOCAL_VOCABS  # noqa: E402
from fusedls.bench.suite import run_benchmark  # noqa: E402

CASES = [Case("fwd+bwd", "fp32", 256, vocab) for vocab in LOCAL_VOCABS[:2]]
PROVIDERS = {p.name: p for p in BENCH.providers()}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c.mode}-{c.dtype}-{c.rows}x{c.cols}")
def case_inputs(request):
    return request.param, BENCH.prepare(request.param, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_vocab_parallel_cross_entropy(benchmark, case_inputs, name):
    case, inputs = case_inputs
    run_benchmark(benchmark, BENCH, PROVIDERS[name], case, inputs)
