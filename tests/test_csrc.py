"""The native backends (csrc/): dispatch, build and load, instruction-set variants, threads,
and the nvcc compile report of the CUDA kernels. Their numbers are tested by the parity suites
(tests/test_cross_entropy*.py and tests/test_vector_norm.py run on every available backend
through the ``backend`` fixture).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import fusedls
import fusedls.backend.cpp
import fusedls.backend.cuda
from fusedls.backend import registry
from fusedls.backend.cpp import _build as cpp_build
from fusedls.backend.cuda import _build as cuda_build
from tools import cuda_report
from fusedls.testing import assert_close, reference_cross_entropy

CPU = torch.device("cpu")
CPP_BUILT = not fusedls.backend.cpp.status()
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason="cpp backend not built (pip install --no-build-isolation -e .)")


@needs_cpp
def test_auto_prefers_cpp_on_cpu_when_built():
    with fusedls.use_backend("auto"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert registry.resolve(CPU, dtype, "cross_entropy") == "cpp"
        assert registry.resolve(CPU, torch.float64, "cross_entropy") == "eager"  # fp64 stays eager


def test_auto_passes_over_ops_and_features_a_backend_lacks():
    with fusedls.use_backend("auto"):
        # no fusedls/backend/cpp/vocab_parallel_cross_entropy.py
        assert registry.resolve(CPU, torch.float32, "vocab_parallel_cross_entropy") == "eager"
        assert registry.resolve(CPU, torch.float32) == "eager"  # callers naming no op
        assert registry.resolve(CPU, torch.float32, "cross_entropy", {"z_loss"}) == "eager"
    assert registry.unsupported("cross_entropy", "cpp", {"z_loss", "softcap"}) == {"z_loss", "softcap"}


@needs_cpp
def test_explicit_backend_lacking_the_op_or_feature_raises():
    with fusedls.use_backend("cpp"):
        with pytest.raises(ValueError, match="'cpp' was requested but cannot run: it has no implementation of vocab_par"):
            registry.resolve(CPU, torch.float32, "vocab_parallel_cross_entropy")
        with pytest.raises(ValueError, match="does not support \\['return_lse'\\]"):
            registry.resolve(CPU, torch.float32, "cross_entropy", {"return_lse"})


def test_cuda_backend_says_why_it_cannot_run():
    info = {b.name: b for b in fusedls.backends()}
    assert set(info) == {"eager", "triton", "cpp", "cuda"}
    if torch.version.cuda is None:
        assert not info["cuda"].available and "CPU-only build" in info["cuda"].reason
    with fusedls.use_backend("cuda"):
        with pytest.raises(ValueError, match="'cuda' was requested but cannot run: the cuda backend runs on cuda"):
            fusedls.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))


@needs_cpp
def test_resolution_is_cached(monkeypatch):
    with fusedls.use_backend("auto"):
        registry.resolve(CPU, torch.float32, "cross_entropy")

        def no_imports(*args, **kwargs):
            raise AssertionError("resolve imported a module")

        monkeypatch.setattr(importlib, "import_module", no_imports)
        monkeypatch.setattr(importlib.util, "find_spec", no_imports)
        assert registry.resolve(CPU, torch.bfloat16, "cross_entropy") == "cpp"


@needs_cpp
def test_loaded_variant_is_the_cpu_capability():
    variant = cpp_build.wanted_variant()
    assert fusedls.backend.cpp.capability() == variant
    if torch.backends.cpu.get_cpu_capability() in cpp_build.variants_here():
        assert variant == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("variant", ["DEFAULT", "AVX2"])
def test_other_variants_pass_the_parity_suite(variant):
    """The variants a CPU with less than AVX-512 loads, run here through ATEN_CPU_CAPABILITY:
    the whole cross-entropy parity suite on the cpp backend (special values differ between
    the instruction sets' exp polynomials: NaN in gave inf on AVX2 before it was handled)."""
    if variant not in cpp_build.variants_here():
        pytest.skip(f"{variant} is not built on this machine")
    if not (cpp_build.prebuilt(variant) or cpp_build.cached(variant)):
        pytest.skip(f"variant {variant} not built (pip install --no-build-isolation -e . builds every variant)")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=variant.lower())
    which = subprocess.run(
        [sys.executable, "-c", "import fusedls.backend.cpp; print(fusedls.backend.cpp.capability())"], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert which.stdout.strip() == variant, which.stderr
    tests = os.path.dirname(os.path.abspath(__file__))
    suite = [os.path.join(tests, f) for f in ("test_cross_entropy.py", "test_cross_entropy_edges.py",
                                              "test_vector_norm.py")]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpp", *suite], env=env,
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(tests),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]


@needs_cpp
def test_threads_split_rows_deterministically():
    x = torch.randn(64, 3000).requires_grad_()
    t = torch.randint(0, 3000, (64,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            xa = x.detach().clone().requires_grad_()
            with fusedls.use_backend("cpp"):
                loss = fusedls.cross_entropy(xa, t, label_smoothing=0.1, reduction="none")
            loss.sum().backward()
            results.append((loss.detach(), xa.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_cpp
@pytest.mark.parametrize("ord", [2, 1, float("inf"), float("-inf")])
def test_vector_norm_runs_in_cpp_and_splits_rows_deterministically(monkeypatch, ord):
    """ord 1, 2, +-inf reach the C++ kernels (not the eager fallback), and the bits do not
    depend on the thread count (rows of several 4096-element blocks, ties included)."""
    from fusedls.backend.eager import vector_norm as eager_norm

    def refuse(*args):
        raise AssertionError("the cpp backend fell back to eager")

    monkeypatch.setattr(eager_norm, "vector_norm_forward", refuse)
    monkeypatch.setattr(eager_norm, "vector_norm_backward", refuse)
    x = torch.randn(48, 9000).round()  # many ties for +-inf
    up = torch.randn(48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            xa = x.clone().requires_grad_()
            with fusedls.use_backend("cpp"):
                out = fusedls.vector_norm(xa, ord, -1)
            out.backward(up)
            results.append((out.detach(), xa.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref = torch.linalg.vector_norm(x.double(), ord, -1)
    assert_close(results[0][0], ref, torch.float32)


@needs_cpp
def test_out_of_range_ids_raise_in_the_binding_and_give_nan_rows_in_the_kernels():
    """The forward binding raises Python's ValueError (one pass over the ids in C++, no Python
    check); the kernels themselves, reached through the backward binding, give NaN rows for such
    ids and read nothing outside the row."""
    from fusedls.backend.cpp import cross_entropy as cpp_ce

    x = torch.randn(4, 10)
    t = torch.tensor([1, 10, -100, -3])
    with pytest.raises(ValueError, match="target contains class id 10, outside \\[0, 10\\) and not ignore_index=-100"):
        cpp_ce.cross_entropy_forward(x, t, None, torch.empty_like(x), torch.tensor(1.0), -100, 0.9, 0.01)
    valid = torch.tensor([1, 5, -100, 2])
    _, lse, coef = cpp_ce.cross_entropy_forward(x, valid, None, None, None, -100, 0.9, 0.01)
    grad = torch.empty_like(x)
    cpp_ce.cross_entropy_backward(torch.tensor(1.0), x, t, None, lse, coef, grad, None, -100, 0.9, 0.01)
    assert grad[[1, 3]].isnan().all() and grad[0].isfinite().all() and (grad[2] == 0).all()
    ref = reference_cross_entropy(x[:1].requires_grad_(), t[:1], label_smoothing=0.1, reduction="sum")[1]
    assert_close(grad[:1], ref)


def test_builds_are_announced_and_can_be_forbidden(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("FUSEDLS_NO_EXTENSIONS", "1")
    assert "FUSEDLS_NO_EXTENSIONS" in cpp_build.build_blocker()
    monkeypatch.delenv("FUSEDLS_NO_EXTENSIONS")
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("FUSEDLS_CACHE_DIR", str(tmp_path))
    cpp_build.jit_build()
    err = capsys.readouterr().err
    assert "fusedls: compiling the cpp backend" in err and f"about {cpp_build.JIT_SECONDS} s" in err
    flags = calls[0]["extra_cflags"]
    assert "-fopenmp" in flags and "-fopenmp" in calls[0]["extra_ldflags"]  # else parallel_for is serial
    assert calls[0]["build_directory"].startswith(str(tmp_path))


def test_variant_flags():
    assert cpp_build.compile_flags("DEFAULT") == list(cpp_build.COMMON_FLAGS)
    avx512 = cpp_build.compile_flags("AVX512")
    assert "-DCPU_CAPABILITY_AVX512" in avx512 and "-mavx512bw" in avx512
    assert "-DCPU_CAPABILITY_AVX2" in cpp_build.compile_flags("AVX2") and "-mf16c" in cpp_build.compile_flags("AVX2")


# ------------------------------------------------------------------ nvcc report (CUDA kernels)

@pytest.mark.skipif(cuda_build.nvcc() is None, reason="nvcc not found (CUDA_HOME or PATH)")
def test_cuda_kernels_compile_for_sm80_and_sm90a_without_spills():
    for arch, report in cuda_report.nvcc_report().items():
        kinds = {name for name in report for k in ("forward_kernel", "backward_kernel", "scale_grad_kernel") if k in name}
        assert len(kinds) == len(report) >= 3 * 3, sorted(report)  # every dtype of the three kernels
        spilling = {k: v for k, v in report.items() if v.get("spill_stores") or v.get("spill_loads") or v.get("stack")}
        assert not spilling, f"sm_{arch}: {spilling}"


def test_unbuilt_cpp_backend(monkeypatch):
    """Not built and not buildable: auto runs eagerly, an explicit request says why."""
    monkeypatch.setattr(fusedls.backend.cpp.LIBRARY, "path", None)
    monkeypatch.setattr(fusedls.backend.cpp.LIBRARY, "_status", "not built for this machine")
    monkeypatch.setattr(registry, "_NATIVE_READY", {})
    monkeypatch.setenv("FUSEDLS_NO_EXTENSIONS", "1")
    info = {b.name: b for b in fusedls.backends()}
    assert not info["cpp"].available and "FUSEDLS_NO_EXTENSIONS" in info["cpp"].reason
    with fusedls.use_backend("auto"):
        assert registry.resolve(CPU, torch.float32, "cross_entropy") == "eager"
    with fusedls.use_backend("cpp"):
        with pytest.raises(ValueError, match="'cpp' was requested but cannot run: .*FUSEDLS_NO_EXTENSIONS is set"):
            fusedls.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))
