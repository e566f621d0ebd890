"""Backend selection: which implementation of an op runs.

Backends
--------
``eager``   pure PyTorch, the same math as the kernels; runs everywhere.
``triton``  the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``auto``    (default) ``triton`` for CUDA tensors when it can run, ``eager`` otherwise.

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

BACKENDS = ("auto", "eager", "triton")


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
    """Every backend, whether it can run here, and if not, why."""
    return [
        BackendInfo("eager", True, ""),
        BackendInfo("triton", not triton_unavailable_reason(), triton_unavailable_reason()),
    ]


def resolve(device: torch.device, dtype: torch.dtype, op: str | None = None, features=()) -> str:
    """The concrete backend ('eager' or 'triton') that runs ``op`` on ``device``/``dtype``.

    fp64 always runs eagerly (the kernels accumulate in fp32). ``features`` names the optional
    parts of ``op`` a call uses (e.g. ``{"softcap"}``); a backend whose module lists one of them
    in ``UNSUPPORTED`` is passed over by ``auto`` (the eager backend supports everything). ``auto``
    never raises; an explicitly requested backend that cannot run raises a ValueError saying why.
    """
    name = requested_backend()
    if dtype == torch.float64 or name == "eager":
        return "eager"
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason:
            raise ValueError(f"backend 'triton' was requested but cannot run: {reason}")
        missing = unsupported(op, "triton", features)
        if missing:
            raise ValueError(f"backend 'triton' was requested but does not support {sorted(missing)} of {op}")
        return "triton"
    if device.type == "cuda" and not triton_unavailable_reason(device) and not unsupported(op, "triton", features):
        return "triton"
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
    imported only then) or ``fusedls.eager.<op>``; both offer the same functions."""
    package = "kernels" if backend == "triton" else "eager"
    return importlib.import_module(f"fusedls.{package}.{op}")
