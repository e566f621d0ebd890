"""Backend selection: which implementation of an op runs.

Backends
--------
``eager``   pure PyTorch, the same math as the kernels; runs everywhere.
``triton``  the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cpp``     fused C++ CPU kernels (``csrc/cpu``); built by pip install, else on first request.
``cuda``    CUDA C++ kernels (``csrc/cuda``); compiled on first request on a GPU machine.
``auto``    (default) CUDA tensors: ``triton``, else ``cuda``; CPU tensors: ``cpp`` when it is
            already built, else ``eager``. Ops or options a backend lacks are passed over.

The requested backend comes from, in order: :func:`use_backend` (a context manager),
:func:`set_backend`, the ``FUSEDLS_BACKEND`` environment variable, and ``auto``. Selection is
a name kept here and resolved per call from the tensors' device; no function is swapped.
Nothing in this module touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "eager", "triton", "cpp", "cuda")
NATIVE = ("cpp", "cuda")  # backends of csrc/, packages fusedls.cpp / fusedls.cuda
_NATIVE_DEVICE = {"cpp": "cpu", "cuda": "cuda"}  # the tensors each runs on
_PACKAGES = {"triton": "kernels", "eager": "eager", "cpp": "cpp", "cuda": "cuda"}


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What :func:`backends` reports for one backend."""

    name: str
    available: bool
    reason: str  # why it is not available ("" when it is)


class _Selection:
    # The explicit choice of set_backend / use_backend; None means "read FUSEDLS_BACKEND".
    requested: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def requested_backend() -> str:
    """The backend name in force: set_backend/use_backend, else FUSEDLS_BACKEND, else 'auto'."""
    if _Selection.requested is not None:
        return _Selection.requested
    env = os.environ.get("FUSEDLS_BACKEND", "auto")
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"FUSEDLS_BACKEND must be one of {BACKENDS}, got {env!r}") from None


def set_backend(name: str | None) -> None:
    """Select the backend for every later call; ``None`` goes back to FUSEDLS_BACKEND/auto."""
    _Selection.requested = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend ``name``."""
    previous = _Selection.requested
    _Selection.requested = _check_name(name)
    try:
        yield
    finally:
        _Selection.requested = previous


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant
def _triton_import_error() -> str:
    if not _TRITON_STATUS:
        _TRITON_STATUS.append(_try_import_triton())
    return _TRITON_STATUS[0]


_TRITON_STATUS: list[str] = []  # filled once: "" or why triton cannot be imported


def _try_import_triton() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break `import fusedls`
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return ""


def triton_unavailable_reason(device: torch.device | None = None) -> str:
    """Why the triton backend cannot run on ``device`` ("" when it can)."""
    reason = _triton_import_error()
    if reason:
        return reason
    if device is None:  # the general question asked by backends()
        if interpreting() or torch.cuda.is_available():
            return ""
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return ""
    if device.type == "cpu":
        return "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
    return f"the triton backend does not run on {device.type} tensors"


def backends() -> list[BackendInfo]:
    """Every backend, whether it can run here, and if not, why. A native backend that is not
    built yet but can be (on its first request) counts as available; its reason says so."""
    found = [
        BackendInfo("eager", True, ""),
        BackendInfo("triton", not triton_unavailable_reason(), triton_unavailable_reason()),
    ]
    for name in NATIVE:
        reason = _native(name).unavailable_reason()
        found.append(BackendInfo(name, not reason or reason.startswith("not built yet"), reason))
    return found


def _native(name: str):
    """The package of a native backend (light: it loads no library until asked)."""
    return importlib.import_module(f"fusedls.{name}")


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant
def _native_ready(name: str) -> bool:
    """Whether native backend ``name`` can run without compiling anything (auto uses it only
    then); found once per process."""
    if name not in _NATIVE_READY:
        library = _native(name).LIBRARY
        _NATIVE_READY[name] = not library.precondition() and not library.status()
    return _NATIVE_READY[name]


_NATIVE_READY: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _native_reason(name: str, device_type: str) -> str:
    """Why native backend ``name``, requested explicitly, cannot run on ``device_type``
    tensors ("" when it can); compiles its library first when it is not built and can be."""
    library = _native(name).LIBRARY
    if device_type != library.device_type:
        return f"the {name} backend runs on {library.device_type} tensors, not {device_type}"
    if _native_ready(name):
        return ""
    reason = library.unavailable_reason(build=True)
    _NATIVE_READY[name] = not reason
    return reason


@torch.compiler.assume_constant_result
def has_implementation(op: str | None, backend: str) -> bool:
    """Whether ``backend`` has a module for ``op`` (found once, without importing it). ``op``
    None (callers that name no op) means an op of the eager and triton backends only."""
    key = (op, backend)
    if key not in _HAS_MODULE:
        if op is None:
            _HAS_MODULE[key] = backend in ("eager", "triton")
        else:
            try:
                _HAS_MODULE[key] = importlib.util.find_spec(f"fusedls.{_PACKAGES[backend]}.{op}") is not None
            except ImportError:  # a package that cannot even be imported has no op
                _HAS_MODULE[key] = False
    return _HAS_MODULE[key]


_HAS_MODULE: dict[tuple, bool] = {}


def _unavailable(name: str, device: torch.device, op: str | None, build: bool) -> str:
    """Why backend ``name`` cannot run ``op`` on ``device`` ("" when it can)."""
    if not has_implementation(op, name):
        return f"it has no implementation of {op or 'this op'}"
    if name == "triton":
        return triton_unavailable_reason(device)
    if build:
        return _native_reason(name, device.type)
    return "" if device.type == _NATIVE_DEVICE[name] and _native_ready(name) else "not built"


def resolve(device: torch.device, dtype: torch.dtype, op: str | None = None, features=()) -> str:
    """The concrete backend (eager, triton, cpp or cuda) that runs ``op`` on ``device``/``dtype``.

    fp64 always runs eagerly (the kernels accumulate in fp32). ``features`` names the optional
    parts of ``op`` a call uses (e.g. ``{"softcap"}``); a backend whose module lists one of them
    in ``UNSUPPORTED``, or that has no module for ``op`` at all, is passed over by ``auto`` (the
    eager backend supports everything). ``auto`` never raises and never compiles anything; an
    explicitly requested backend that cannot run raises a ValueError saying why (a native one
    that is not built yet is compiled first, announced on stderr). Every answer that does not
    depend on the tensors is cached, so this costs a few dictionary lookups per call.
    """
    name = requested_backend()
    if dtype == torch.float64 or name == "eager":
        return "eager"
    if name != "auto":
        reason = _unavailable(name, device, op, build=True)
        if reason:
            raise ValueError(f"backend {name!r} was requested but cannot run: {reason}")
        missing = unsupported(op, name, features)
        if missing:
            raise ValueError(f"backend {name!r} was requested but does not support {sorted(missing)} of {op}")
        return name
    candidates = ("triton", "cuda") if device.type == "cuda" else ("cpp",) if device.type == "cpu" else ()
    for candidate in candidates:
        if not _unavailable(candidate, device, op, build=False) and not unsupported(op, candidate, features):
            return candidate
    return "eager"


def unsupported(op: str | None, backend: str, features) -> frozenset:
    """The ``features`` of ``op`` that ``backend`` does not implement (its module's UNSUPPORTED)."""
    if op is None or not features:
        return frozenset()
    return frozenset(features) & frozenset(_unsupported_names(op, backend))


@torch.compiler.assume_constant_result  # torch.compile cannot trace the module import
def _unsupported_names(op: str, backend: str) -> tuple:
    return tuple(sorted(getattr(implementation(op, backend), "UNSUPPORTED", ())))


def implementation(op: str, backend: str):
    """The module implementing ``op`` on a concrete backend: ``fusedls.kernels.<op>`` (triton,
    imported only then), ``fusedls.eager.<op>``, ``fusedls.cpp.<op>`` or ``fusedls.cuda.<op>``;
    all offer the same functions."""
    return importlib.import_module(f"fusedls.{_PACKAGES[backend]}.{op}")
