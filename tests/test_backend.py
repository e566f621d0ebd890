"""Backend selection and reporting."""

import ast
import importlib.util
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedls
from fusedls.backend import protocols, registry


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(registry, "_TRITON_STATUS", ["triton is not installed (pip install triton; Linux only)"])


def test_backends_report(no_triton):
    report = {b.name: b for b in fusedls.backends()}
    assert report["eager"].available and report["eager"].reason == ""
    assert not report["triton"].available and "not installed" in report["triton"].reason


def test_precedence_context_over_setter_over_environment(monkeypatch):
    monkeypatch.setenv("FUSEDLS_BACKEND", "triton")
    assert registry.requested_backend() == "auto"  # read at import, and again by set_backend(None)
    fusedls.set_backend(None)
    assert registry.requested_backend() == "triton"
    try:
        fusedls.set_backend("auto")
        assert registry.requested_backend() == "auto"
        with fusedls.use_backend("EAGER"):
            assert registry.requested_backend() == "eager"
        assert registry.requested_backend() == "auto"
    finally:
        fusedls.set_backend(None)
    assert registry.requested_backend() == "triton"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedls.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fusedls.use_backend("fast"):
            pass
    monkeypatch.setenv("FUSEDLS_BACKEND", "turbo")
    fusedls.set_backend(None)  # a bad value is said when a call needs it, not when it is read
    with pytest.raises(ValueError, match="FUSEDLS_BACKEND must be one of"):
        fusedls.cross_entropy(torch.zeros(1, 3), torch.tensor([0]))


def test_auto_resolution(monkeypatch):
    monkeypatch.setattr(registry, "_TRITON_STATUS", [""])
    monkeypatch.setattr(registry._State, "interpreting", False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with fusedls.use_backend("auto"):
        assert registry.resolve(cuda, torch.bfloat16) == "triton"
        assert registry.resolve(cuda, torch.float64) == "eager"  # the kernels accumulate in fp32
        assert registry.resolve(cpu, torch.float32) == "eager"
    with fusedls.use_backend("triton"):
        with pytest.raises(ValueError, match="CPU tensors need TRITON_INTERPRET=1"):
            registry.resolve(cpu, torch.float32)
    monkeypatch.setattr(registry._State, "interpreting", True)
    monkeypatch.setattr(registry, "_RESOLVED", {})
    with fusedls.use_backend("triton"):
        assert registry.resolve(cpu, torch.float32) == "triton"


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


# ------------------------------------------------------------------------- the backend layer


def _modules():
    """(backend, op, module) of every implementation the registry lists (triton's only where
    triton imports)."""
    for backend, ops in registry.OPS.items():
        if backend == "triton" and registry._triton_import_error():
            continue
        for op in ops:
            yield backend, op, registry.implementation(op, backend)


@pytest.mark.parametrize("backend,op,module", list(_modules()), ids=lambda v: getattr(v, "__name__", v))
def test_every_backend_module_satisfies_its_protocol(backend, op, module):
    # Same member names, parameter names, order and defaults as the op's Protocol; the registry's
    # table names exactly the modules that exist.
    protocol = protocols.PROTOCOLS[op]
    assert isinstance(module, protocol), f"{module.__name__} lacks a member of {protocol.__name__}"
    assert module.__name__ == f"fusedls.backend.{backend}.{op}"
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        have = list(inspect.signature(getattr(module, name)).parameters.values())
        assert [(p.name, p.default) for p in have] == [(p.name, p.default) for p in want], f"{module.__name__}.{name}"
    assert isinstance(module.UNSUPPORTED, frozenset)


def test_registry_lists_every_backend_module():
    root = Path(fusedls.__file__).parent / "backend"
    on_disk = {
        (folder.name, f.stem)
        for folder in root.iterdir() if folder.is_dir() and folder.name in registry.OPS
        for f in folder.glob("*.py") if f.stem in protocols.PROTOCOLS
    }  # fmt: skip
    assert on_disk == {(b, op) for b, ops in registry.OPS.items() for op in ops}


def test_no_module_imports_a_layer_above_it():
    # The backends import nothing from fusedls.ops, fusedls.nn or the public package; the ops nothing
    # from fusedls.nn; and no module of fusedls imports inside a function to dodge a cycle (the one
    # exception: the registry imports the triton package on first use, since it imports triton).
    root = Path(fusedls.__file__).parent
    above = {"backend": ("fusedls.ops", "fusedls.nn", "fusedls.distributed", "fusedls.bench"),
             "ops": ("fusedls.nn", "fusedls.distributed", "fusedls.bench")}  # fmt: skip
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text())
        package = ".".join(("fusedls", *rel.parent.parts))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module and not node.level:
                continue
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            if not target.startswith("fusedls"):
                continue
            for layer, banned in above.items():
                if rel.parts[0] == layer:
                    assert not target.startswith(banned), f"{rel} imports {target}"
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and rel.parts[0] != "bench":
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        names = [a.name for a in node.names]
                        local = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fusedls"))
                        allowed = rel.as_posix() == "backend/registry.py" and names == ["triton"]
                        assert not local or allowed, f"{rel}:{node.lineno} imports {names} inside {fn.name}()"
