"""The step shared by the pytest-benchmark suite (``benchmarks/test_bench_*.py``).

It lives in the package rather than in a ``benchmarks/conftest.py``: test modules that import
from a conftest by name (``from conftest import ...``) find whichever conftest pytest loaded
last, so a session collecting ``tests`` and ``benchmarks`` together would break.
"""

from __future__ import annotations


def run_benchmark(benchmark, bench, provider, case, inputs) -> None:
    """One pytest-benchmark measurement of ``provider`` on ``case``, as ``python -m fusedls.bench``
    does it: check against torch first (also the warm-up: torch.compile compiles here; a wrong
    fusedls result fails the test), then time the call with its per-call setup untimed."""
    fn = provider.build()
    error = bench.check(fn, provider, case, inputs)
    assert provider.kind != "fusedls" or error <= 1, f"{provider.name}: error {error:.3g} of the tolerance"
    setup, call = bench.timed_call(fn, provider, case, inputs)
    benchmark.group = f"{bench.name} {case.mode} {case.dtype} {case.rows}x{case.cols}"
    benchmark.extra_info.update(bytes=bench.bytes(case), error_of_tolerance=error)
    benchmark.pedantic(call, setup=setup, rounds=15, warmup_rounds=1)
