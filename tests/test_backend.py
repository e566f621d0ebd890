"""Backend selection and reporting."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fusedls
from fusedls import _backend


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(_backend, "_TRITON_STATUS", ["triton is not installed (pip install triton; Linux only)"])


def test_backends_report(no_triton):
    report = {b.name: b for b in fusedls.backends()}
    assert report["eager"].available and report["eager"].reason == ""
    assert not report["triton"].available and "not installed" in report["triton"].reason


def test_precedence_context_over_setter_over_environment(monkeypatch):
    monkeypatch.setenv("FUSEDLS_BACKEND", "triton")
    assert _backend.requested_backend() == "triton"
    try:
        fusedls.set_backend("auto")
        assert _backend.requested_backend() == "auto"
        with fusedls.use_backend("EAGER"):
            assert _backend.requested_backend() == "eager"
        assert _backend.requested_backend() == "auto"
    finally:
        fusedls.set_backend(None)
    assert _backend.requested_backend() == "triton"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedls.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fusedls.use_backend("fast"):
            pass
    monkeypatch.setenv("FUSEDLS_BACKEND", "turbo")
    with pytest.raises(ValueError, match="FUSEDLS_BACKEND must be one of"):
        fusedls.cross_entropy(torch.zeros(1, 3), torch.tensor([0]))


def test_auto_resolution(monkeypatch):
    monkeypatch.setattr(_backend, "_TRITON_STATUS", [""])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with fusedls.use_backend("auto"):
        assert _backend.resolve(cuda, torch.bfloat16) == "triton"
        assert _backend.resolve(cuda, torch.float64) == "eager"  # the kernels accumulate in fp32
        assert _backend.resolve(cpu, torch.float32) == "eager"
    with fusedls.use_backend("triton"):
        with pytest.raises(ValueError, match="CPU tensors need TRITON_INTERPRET=1"):
            _backend.resolve(cpu, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fusedls.use_backend("triton"):
        assert _backend.resolve(cpu, torch.float32) == "triton"


def test_explicit_backend_that_cannot_run_raises_auto_never_does(no_triton):
    x, t = torch.randn(2, 4), torch.tensor([0, 3])
    with fusedls.use_backend("triton"):
        with pytest.raises(ValueError, match="'triton' was requested but cannot run: triton is not installed"):
            fusedls.cross_entropy(x, t)
    with fusedls.use_backend("auto"):
        assert torch.isfinite(fusedls.cross_entropy(x, t))


def test_import_and_run_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        sys.modules["triton.language"] = None
        import torch, fusedls
        x = torch.randn(3, 11, requires_grad=True)
        fusedls.cross_entropy(x, torch.tensor([1, 2, -100]), label_smoothing=0.1).backward()
        assert x.grad.abs().sum() > 0
        info = {b.name: b for b in fusedls.backends()}
        assert not info["triton"].available, info
        print("ok", info["triton"].reason)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok triton failed to import") or out.stdout.startswith("ok triton is not installed")
