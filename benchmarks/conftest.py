"""The pytest-benchmark suite measures the checkout it belongs to, whatever fusedls is installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
