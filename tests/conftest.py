"""Shared fixtures.

Without a GPU, the Triton kernels run on CPU tensors through the interpreter, which must be
switched on before triton compiles anything, hence the environment set here at import. On a
GPU machine the tests run on CUDA tensors with compiled kernels (unless TRITON_INTERPRET=1).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import fusedls  # noqa: E402
from fusedls.backend import registry  # noqa: E402



def _interpreter_rounds_fp32_to_bf16_like_a_gpu() -> None:
    """Triton's interpreter truncates fp32 -> bf16; GPUs round to nearest even. Without this
    the interpreter's bf16 results carry up to twice the rounding error the kernels really
    have, and the tolerance table would have to hide it."""
    if not registry.interpreting() or registry._triton_import_error():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = getattr(interpreter, "_convert_float", None)
    if truncating is None or getattr(truncating, "_fusedls_rne", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(input).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            nan = np.isnan(np.ascontiguousarray(input).view(np.float32))
            rounded = np.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
            return rounded.astype(np.uint16).reshape(input.shape)
        return truncating(input, input_dtype, output_dtype, rounding_mode)

    convert._fusedls_rne = True
    interpreter._convert_float = convert


_interpreter_rounds_fp32_to_bf16_like_a_gpu()


def _interpreter_multiplies_bf16_like_a_gpu() -> None:
    """Triton's interpreter hands tl.dot's bf16 operands to numpy as their raw 16-bit integers
    (numpy has no bf16) and multiplies those; widen them to fp32 first (exactly), as the tensor
    cores' products are."""
    if not registry.interpreting() or registry._triton_import_error():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    if getattr(dot, "_fusedls_bf16", False):
        return

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = np.ascontiguousarray(handle.data).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fusedls_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


_interpreter_multiplies_bf16_like_a_gpu()

ON_GPU = torch.cuda.is_available() and not registry.interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"

AVAILABLE = [b.name for b in fusedls.backends() if b.available]


REASONS = {b.name: b.reason for b in fusedls.backends()}


@pytest.fixture(params=["eager", "triton", "cpp", "cuda"])
def backend(request):
    """Every backend, each test run once per backend; unavailable ones are skipped, and so are
    the native backends (cpp, cuda) for the ops they do not implement (test_<op>.py)."""
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"backend {name} unavailable: {REASONS[name]}")
    if name in ("cpp", "cuda"):
        if DEVICE != {"cpp": "cpu", "cuda": "cuda"}[name]:
            pytest.skip(f"backend {name} runs on {'CPU' if name == 'cpp' else 'CUDA'} tensors, tests use {DEVICE}")
        # The op under test: the module's OP, else its name (test_<op>.py, test_<op>_edges.py).
        op = getattr(request.module, "OP", request.module.__name__.removeprefix("test_").split("_edges")[0])
        if not registry.has_implementation(op, name):
            pytest.skip(f"backend {name} has no {op}")
    with fusedls.use_backend(name):
        yield name


@pytest.fixture(autouse=True)
def fresh_backend_selection(monkeypatch):
    """Each test starts from the selection the process started with and an empty resolution
    cache, and whatever it changes (set_backend, FUSEDLS_BACKEND read again, the interpreter
    flag) is undone after it."""
    for name in ("requested", "from_environment", "interpreting"):
        monkeypatch.setattr(registry._State, name, getattr(registry._State, name))
    monkeypatch.setattr(registry, "_RESOLVED", {})


# The triton cross-entropy forward's paths (fusedls/backend/triton/tuning.py picks one per row):
# rows swept in chunks, held whole in registers, or split into slices of 16 that exchange their
# partials (the interpreter runs the two-phase variant). The cross-entropy tests
# (test_cross_entropy*.py) that take small_chunks run once per path; the others take the first.
CROSS_ENTROPY_PATHS = ("chunks", "resident", "split")


def pytest_generate_tests(metafunc):
    if "small_chunks" in metafunc.fixturenames and metafunc.module.__name__.startswith("test_cross_entropy"):
        metafunc.parametrize("small_chunks", CROSS_ENTROPY_PATHS, indirect=True)


@pytest.fixture
def small_chunks(request, monkeypatch):
    """Chunks of 16 classes, so small vocabularies run the kernels' chunk loop many times, and
    3 programs, so each program of a persistent kernel loops over several rows; in the
    cross-entropy tests, once per path of the triton forward (the other backends: once)."""
    path = getattr(request, "param", CROSS_ENTROPY_PATHS[0])
    if path != CROSS_ENTROPY_PATHS[0]:
        if "triton" not in AVAILABLE:
            pytest.skip(f"the triton path {path}: triton unavailable")
        if "backend" in request.fixturenames and request.getfixturevalue("backend") != "triton":
            pytest.skip(f"{path} is a path of the triton backend")
    if "triton" in AVAILABLE:
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "CROSS_ENTROPY_MAX_BLOCK", {2: 16, 4: 16})
        monkeypatch.setattr(tuning, "INTERPRETER_PROGRAMS", 3)
        resident_max = 1 << 20 if path == "resident" else 0
        monkeypatch.setattr(tuning, "CROSS_ENTROPY_RESIDENT_MAX", {2: resident_max, 4: resident_max})
        monkeypatch.setattr(tuning, "CROSS_ENTROPY_RESIDENT_MAX_EXTRAS", resident_max)
        split = {2: 16, 4: 16} if path == "split" else {2: 0, 4: 0}
        monkeypatch.setattr(tuning, "CROSS_ENTROPY_SPLIT_BLOCK", split)
        monkeypatch.setattr(tuning, "CROSS_ENTROPY_SPLIT_MIN_COLS", {2: 0, 4: 0})
    monkeypatch.setattr("fusedls.backend.eager.cross_entropy._BLOCK_ELEMENTS", 64)
    monkeypatch.setattr("fusedls.backend.eager.cross_entropy._DEVICE_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr("fusedls.backend.cpp.cross_entropy.BLOCK_C", 32)  # several blocks of 2 vector steps


@pytest.fixture
def device():
    return DEVICE
