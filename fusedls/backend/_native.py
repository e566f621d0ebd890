"""What the native backends (``cpp``: fusedls/backend/cpp/, ``cuda``: fusedls/backend/cuda/) share: finding,
building just in time, and loading a torch operator library compiled from ``csrc/``.

A library is an operator namespace (``torch.ops.<namespace>``) registered by a shared object
that comes either from ``pip install`` (inside the package) or from a just-in-time build
(``torch.utils.cpp_extension.load``, ninja) into a cache directory keyed by the sources, the
flags and the torch version (``$FUSEDLS_CACHE_DIR``, default ``~/.cache/fusedls``). A JIT build
happens only when the backend is requested explicitly, and is announced on stderr with its
expected duration. ``FUSEDLS_NO_EXTENSIONS=1`` forbids every build (prebuilt libraries still load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (csrc/ beside fusedls/)
CSRC = os.path.join(ROOT, "csrc")


def extensions_disabled() -> bool:
    return os.environ.get("FUSEDLS_NO_EXTENSIONS", "0") not in ("", "0")


def cache_dir(tag: str, files: list[str], flags: list[str]) -> str:
    """The JIT build directory of ``tag`` for these source files and flags."""
    digest = hashlib.sha256(f"{torch.__version__}|{flags}".encode())
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    base = os.environ.get("FUSEDLS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedls")
    return os.path.join(base, f"{tag}-{digest.hexdigest()[:16]}")


def toolchain_blocker(sources: list[str], compiler: str) -> str:
    """Why a JIT build of ``sources`` with ``compiler`` cannot run ("" when it can)."""
    if extensions_disabled():
        return "FUSEDLS_NO_EXTENSIONS is set"
    if not all(os.path.exists(p) for p in sources):
        return f"no prebuilt library and no sources to build one (csrc/ not found under {ROOT})"
    if shutil.which(compiler) is None and not os.path.exists(compiler):
        return f"no compiler ({compiler!r} not found)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return ""


def jit_build(label: str, name: str, directory: str, seconds: int, **load_kwargs) -> str:
    """Builds and loads library ``name`` in ``directory`` (announced on stderr); returns its path."""
    from torch.utils import cpp_extension

    os.makedirs(directory, exist_ok=True)
    print(
        f"fusedls: compiling the {label} for this machine, about {seconds} s, once; cached in {directory}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    cpp_extension.load(name=name, build_directory=directory, is_python_module=False, verbose=False, **load_kwargs)
    print(f"fusedls: {label} compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return os.path.join(directory, name + ".so")


@dataclasses.dataclass
class NativeLibrary:
    """One native backend's library: where it is, whether it can be built, loading it."""

    backend: str  # "cpp" / "cuda"
    namespace: str  # torch.ops.<namespace>
    device_type: str  # the tensors it runs on
    locate: Callable[[], str | None]  # path of a built library (prebuilt or cached), or None
    blocker: Callable[[], str]  # why it cannot run or be built here ("" when it can)
    build: Callable[[], str]  # JIT build and load; returns the path
    seconds: int  # expected JIT build time, said in the reasons
    precondition: Callable[[], str] = lambda: ""  # why it cannot run here at all ("" when it can)
    path: str | None = None  # the loaded library
    _status: str | None = None
    _ops: object = None  # torch.ops.<namespace>, once loaded

    def status(self) -> str:
        """"" when the library is built (loaded, or loadable without compiling), else why not;
        computed once per process (finding the JIT cache reads the sources)."""
        if self._status is None:
            self._status = "" if self.path or self.locate() else "not built for this machine"
        return self._status

    def unavailable_reason(self, device: torch.device | None = None, build: bool = False) -> str:
        """Why the backend cannot run on ``device`` ("" when it can). ``build``: compile the
        library now (announced on stderr) if it is not built and can be."""
        if device is not None and device.type != self.device_type:
            return f"the {self.backend} backend runs on {self.device_type} tensors, not {device.type}"
        missing = self.precondition()
        if missing:
            return missing
        if not self.status():
            return ""
        blocker = self.blocker()
        if blocker:
            return f"the native library is not built and cannot be: {blocker}"
        if not build:
            return f"not built yet: compiles on first request (about {self.seconds} s, once)"
        try:
            self.load()
        except Exception as exc:  # a failed build must say why, not break the caller
            return f"building the native library failed: {type(exc).__name__}: {exc}"
        return ""

    def load(self) -> str:
        """Loads the library (building it first when needed and allowed); returns its path."""
        if self.path is None:
            path = self.locate()
            if path is not None:
                torch.ops.load_library(path)
            else:
                blocker = self.blocker()
                if blocker:
                    raise RuntimeError(f"the native library is not built and cannot be: {blocker}")
                path = self.build()
            self.path, self._status = path, ""
        return self.path

    def ops(self):
        """``torch.ops.<namespace>``, the library loaded (looked up once)."""
        if self._ops is None:
            if self.path is None:
                self.load()
            self._ops = getattr(torch.ops, self.namespace)
        return self._ops


def cross_entropy_functions(library: NativeLibrary, block_c: Callable[[], int]):
    """The three functions of the cross-entropy backend interface (fusedls/backend/eager/cross_entropy.py)
    on ``library``'s ops; ``block_c()`` gives the classes per chunk of a row sweep (0: default)."""

    def cross_entropy_forward(logits, target, weight, grad, grad_scale, ignore_index, keep, spread, z_loss=0.0,
                              softcap=None, argmax=None):  # fmt: skip
        """``CrossEntropyBackend.cross_entropy_forward`` (fusedls/backend/protocols.py), without
        z_loss, softcap and argmax (the module's UNSUPPORTED: the registry never sends them here)."""
        _refuse(z_loss != 0.0, softcap, argmax)
        loss, lse, coef = library.ops().cross_entropy_forward(
            logits, target, weight, grad, grad_scale, ignore_index, keep, spread, block_c()
        )
        return loss, lse, coef

    def cross_entropy_backward(grad_loss, logits, target, weight, lse, coef, grad, grad_target, ignore_index, keep,
                               spread, softcap=None):  # fmt: skip
        """``CrossEntropyBackend.cross_entropy_backward``, without softcap."""
        _refuse(False, softcap, None)
        library.ops().cross_entropy_backward(
            grad_loss, logits, target, weight, lse, coef, grad, grad_target, ignore_index, keep, spread, block_c()
        )

    def cross_entropy_scale_grad_(grad, factor):
        """``grad *= factor`` row by row; rows whose factor is exactly 1 are left alone (decided
        on the device for CUDA tensors, without synchronising)."""
        if factor.device.type == "cpu" and factor.dim() == 0 and float(factor) == 1.0:
            return  # loss.backward() on CPU: nothing to do (reading a CPU scalar costs nothing)
        library.ops().cross_entropy_scale_grad_(grad, factor)

    def _refuse(z_loss: bool, softcap, argmax) -> None:
        if z_loss or softcap is not None or argmax is not None:
            raise ValueError(f"the {library.backend} backend implements neither z_loss, softcap nor the argmax")

    return cross_entropy_forward, cross_entropy_backward, cross_entropy_scale_grad_
