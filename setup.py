"""Build script. Metadata lives in pyproject.toml; this file declares the native CPU library
of the ``cpp`` backend (csrc/cpu), one extension per instruction-set variant (see
fusedls/backend/cpp/_build.py), built with torch's BuildExtension (ninja).

    pip install --no-build-isolation -e ".[test]"     # torch installed first, as it must be

The variants are built when torch is importable at build time (hence --no-build-isolation:
an isolated build would fetch a multi-GB CUDA torch, so it is never asked for) and a C++
compiler is present. ``FUSEDLS_NO_EXTENSIONS=1`` skips them. Without them, or if one fails to
compile (a warning says why), the install still succeeds and the library is compiled on first
request instead (fusedls/backend/_native.py). The CUDA backend is never built here: it compiles on
first use on a GPU machine.
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(message):
    print(f"fusedls setup: {message}", file=sys.stderr)


def _native_extensions():
    """(ext_modules, cmdclass) of the cpp backend, or ([], {}) with the reason printed."""
    if os.environ.get("FUSEDLS_NO_EXTENSIONS", "0") not in ("", "0"):
        _say("FUSEDLS_NO_EXTENSIONS is set: the cpp backend is not built (it compiles on first request)")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time (install torch first, then pip install --no-build-isolation): "
             "the cpp backend is not built (it compiles on first request)")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler!r}): the cpp backend is not built")
        return [], {}
    sys.path.insert(0, HERE)
    from fusedls.backend.cpp import _build

    extensions = [
        cpp_extension.CppExtension(
            name=f"fusedls.backend.cpp.{_build.library_name(variant)}",
            sources=[os.path.join("csrc", source) for source in _build.SOURCES],
            extra_compile_args=_build.compile_flags(variant),
            extra_link_args=list(_build.LINK_FLAGS),
        )
        for variant in _build.variants_here()
    ]

    class BuildNative(cpp_extension.BuildExtension):
        """Each variant's failure is a warning, not a failed install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors reach here as various exception types
                _say(f"building {ext.name} failed ({type(exc).__name__}: {exc}); it compiles on first request")

    return extensions, {"build_ext": BuildNative.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
