"""Backend selection: which implementation of an op runs.

Backends (one folder each beside this file, one module per op; the interface every module of
an op implements is that op's Protocol in ``protocols.py``):

``eager``   pure PyTorch, the same math as the kernels; runs everywhere.
``triton``  the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``cpp``     fused C++ CPU kernels (``csrc/cpu``); built by pip install, else on first request.
``cuda``    CUDA C++ kernels (``csrc/cuda``); compiled on first request on a GPU machine.
``auto``    (default) CUDA tensors: ``triton``, else ``cuda``; CPU tensors: ``cpp`` when it is
            already built, else ``eager``. Ops, options or sizes a backend lacks are passed over.

The requested backend comes from, in order: :func:`use_backend` (a context manager),
:func:`set_backend`, the ``FUSEDLS_BACKEND`` environment variable (read when fusedls is
imported and again by ``set_backend(None)``, as is ``FUSEDLS_CHECK_TARGETS``), and ``auto``. ``TRITON_INTERPRET`` is read once,
when the triton backend is first asked about: triton's own ``@jit`` reads it once too, when a
kernel module is imported. A call asks :func:`resolve` for a backend name and
:func:`implementation` for its module; both answers are cached, so a call costs a few
dictionary lookups here. Nothing in this module touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from types import ModuleType
from typing import Callable, Iterator

import torch

from . import cpp, cuda, eager

BACKENDS = ("auto", "eager", "triton", "cpp", "cuda")
NATIVE = {"cpp": cpp, "cuda": cuda}  # the backends of csrc/, each package holding its LIBRARY
# The ops each backend implements: fusedls/backend/<backend>/<op>.py, imported by its package.
OPS = {
    "eager": ("cross_entropy", "dropout", "foreach_norm", "vector_norm", "vocab_parallel_cross_entropy",
              "linear_cross_entropy"),
    "triton": ("cross_entropy", "dropout", "foreach_norm", "vector_norm", "vocab_parallel_cross_entropy",
               "linear_cross_entropy"),
    "cpp": ("cross_entropy", "dropout", "foreach_norm", "vector_norm"),
    "cuda": ("cross_entropy",),
}


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What :func:`backends` reports for one backend."""

    name: str
    available: bool
    reason: str  # why it is not available ("" when it is)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def _environment_backend() -> str:
    env = os.environ.get("FUSEDLS_BACKEND", "auto")
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"FUSEDLS_BACKEND must be one of {BACKENDS}, got {env!r}") from None


class _State:
    """The selection in force: ``requested`` is set_backend / use_backend's choice, else the
    environment's (``from_environment``, read at import and by ``set_backend(None)``)."""

    requested: str | None = None
    from_environment: str | None = None  # None: FUSEDLS_BACKEND held a bad name (raised when used)
    interpreting: bool | None = None  # TRITON_INTERPRET, read on first use
    check_targets: bool = False  # FUSEDLS_CHECK_TARGETS=1: a synchronising class-id check on every backend


def _read_environment() -> None:
    try:
        _State.from_environment = _environment_backend()
    except ValueError:
        _State.from_environment = None  # said when a call needs it, not at import
    _State.check_targets = os.environ.get("FUSEDLS_CHECK_TARGETS", "0") not in ("", "0")


_read_environment()


def requested_backend() -> str:
    """The backend name in force: set_backend/use_backend, else FUSEDLS_BACKEND, else 'auto'."""
    if _State.requested is not None:
        return _State.requested
    if _State.from_environment is None:
        return _environment_backend()  # raises, naming the bad value
    return _State.from_environment


def set_backend(name: str | None) -> None:
    """Select the backend for every later call; ``None`` goes back to FUSEDLS_BACKEND (read
    again now) or auto."""
    if name is None:
        _read_environment()
        _State.requested = None
    else:
        _State.requested = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend ``name``."""
    previous = _State.requested
    _State.requested = _check_name(name)
    try:
        yield
    finally:
        _State.requested = previous


def check_targets() -> bool:
    """Whether every backend's call checks class ids on the host (``FUSEDLS_CHECK_TARGETS=1``, for
    debugging: one synchronisation per call). Without it CPU backends raise on bad ids and GPU
    kernels give NaN rows."""
    return _State.check_targets


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``, read once)."""
    if _State.interpreting is None:
        _State.interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _State.interpreting


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
    for name, package in NATIVE.items():
        reason = package.LIBRARY.unavailable_reason()
        found.append(BackendInfo(name, not reason or reason.startswith("not built yet"), reason))
    return found


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant
def _native_ready(name: str) -> bool:
    """Whether native backend ``name`` can run without compiling anything (auto uses it only
    then); found once per process."""
    if name not in _NATIVE_READY:
        library = NATIVE[name].LIBRARY
        _NATIVE_READY[name] = not library.precondition() and not library.status()
    return _NATIVE_READY[name]


_NATIVE_READY: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _native_reason(name: str, device_type: str) -> str:
    """Why native backend ``name``, requested explicitly, cannot run on ``device_type``
    tensors ("" when it can); compiles its library first when it is not built and can be."""
    library = NATIVE[name].LIBRARY
    if device_type != library.device_type:
        return f"the {name} backend runs on {library.device_type} tensors, not {device_type}"
    if _native_ready(name):
        return ""
    reason = library.unavailable_reason(build=True)
    _NATIVE_READY[name] = not reason
    _RESOLVED.clear()  # auto may pick the library it has just built
    return reason


def has_implementation(op: str | None, backend: str) -> bool:
    """Whether ``backend`` implements ``op`` (:data:`OPS`). ``op`` None (callers that name no op)
    means an op of the eager and triton backends only."""
    if op is None:
        return backend in ("eager", "triton")
    return op in OPS.get(backend, ())


def _unavailable(name: str, device: torch.device, op: str | None, build: bool) -> str:
    """Why backend ``name`` cannot run ``op`` on ``device`` ("" when it can)."""
    if not has_implementation(op, name):
        return f"it has no implementation of {op or 'this op'}"
    if name == "triton":
        return triton_unavailable_reason(device)
    if build:
        return _native_reason(name, device.type)
    return "" if device.type == NATIVE[name].LIBRARY.device_type and _native_ready(name) else "not built"


_RESOLVED: dict[tuple, str] = {}


def resolve(device: torch.device, dtype: torch.dtype, op: str | None = None, features=frozenset(),
            fits: Callable[[ModuleType], str] | None = None) -> str:  # fmt: skip
    """The concrete backend (eager, triton, cpp or cuda) that runs ``op`` on ``device``/``dtype``.

    fp64 always runs eagerly (the kernels accumulate in fp32). ``features`` names the optional
    parts of ``op`` a call uses (e.g. ``{"softcap"}``); a backend whose module lists one of them
    in ``UNSUPPORTED``, or that has no module for ``op`` at all, is passed over by ``auto`` (the
    eager backend supports everything). ``fits(module)`` (not cached) says why a backend's module
    cannot take this call's sizes ("" when it can): a limit the backend declares, e.g. the norm
    kernels' row length. ``auto`` never raises and never compiles anything; an explicitly
    requested backend that cannot run raises a ValueError saying why (a native one that is not
    built yet is compiled first, announced on stderr). Answers without ``fits`` are cached by
    (op, device type, dtype, features, requested backend).
    """
    name = requested_backend()
    if type(features) is not frozenset:
        features = frozenset(features)
    key = (op, device.type, dtype, features, name)
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve(name, device, dtype, op, features)
    if fits is None or found == "eager":
        return found
    reason = fits(implementation(op, found))
    if not reason:
        return found
    if name != "auto":
        raise ValueError(f"backend {name!r} was requested but cannot run: {reason} (the 'auto' backend runs it eagerly)")
    return "eager"


def _resolve(name: str, device: torch.device, dtype: torch.dtype, op: str | None, features) -> str:
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
    return frozenset(features) & _unsupported_names(op, backend)


@torch.compiler.assume_constant_result  # torch.compile cannot trace the module import
def _unsupported_names(op: str, backend: str) -> frozenset:
    return frozenset(implementation(op, backend).UNSUPPORTED)


_PACKAGES: dict[str, ModuleType] = {"eager": eager, "cpp": cpp, "cuda": cuda}


def implementation(op: str, backend: str) -> ModuleType:
    """The module implementing ``op`` on a concrete backend: ``fusedls.backend.<backend>.<op>``,
    which satisfies ``protocols.<Op>Backend``. The triton package is imported on first use here
    (it imports triton); the others are imported with this module."""
    package = _PACKAGES.get(backend)
    if package is None:
        if backend != "triton":
            raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
        from . import triton as package  # the kernels: imports triton, so only when first asked for

        _PACKAGES["triton"] = package
    return getattr(package, op)
