"""``vector_norm`` cases and providers: ord-2 norms of activations.

Workload: the ord-2 norm of randn data, two shapes of reduction (``Case.rows`` tells which):

- rows R > 1: ``x`` of shape (R, N), the norm along ``dim=-1`` (activation norms along the
  hidden size: many rows of moderate length; fusedls's row kernel);
- rows == 1: ``x`` of N elements, shaped (N / 4096, 4096) when 4096 divides N, the norm with
  ``dim=None`` (a whole tensor: one long row; fusedls's two-stage split reduction).

Providers: ``torch.linalg.vector_norm`` eager (the reference for speed-up and memory), its
``torch.compile`` (compiled per case for its static shape, on the first, untimed call), and
``fusedls.vector_norm`` on every fusedls backend that can run here (a backend that cannot, or
that ``auto`` would not pick for this device and dtype, is listed with the reason).

Byte model (``s`` bytes per element, ``n = R*N``; the norms and their gradient, R values, are
negligible): fwd reads x once, ``n*s``; bwd reads x and writes dx, ``2*n*s``; fwd+bwd ``3*n*s``.
The copy baseline is read + write of x (``2*n*s``); the goal is fwd at >= 85 % of its bandwidth.

Check before timing: the norms, and for bwd / fwd+bwd the gradient of a randn upstream gradient,
against torch in float64 on the same rounded input, as a fraction of
``fusedls.testing.tolerance(dtype)`` (each is one rounding of an fp32 value).
"""

from __future__ import annotations

import functools

import torch

import fusedls
from fusedls.testing import tolerance

from .core import Case, OpBench, Provider, Slice, backend_why_not
from .dropout import _error_ratio  # max |a - e| / (atol + rtol |e|)

ORD = 2
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in a cheaper one
TRAFFIC = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # least traffic in units of n*s
BYTE_MODEL = (
    "s = bytes per element, n = R*N (the R norms neglected); fwd: read x = n*s; bwd: read x + write dx = "
    "2ns; fwd+bwd: 3ns; copy baseline: read + write x = 2ns"
)
SPLIT_WIDTH = 4096  # the last dim of the dim=None cases


def _torch(x, dim):
    return torch.linalg.vector_norm(x, ORD, dim)


def _compiled():
    torch.compiler.reset()  # a fresh compilation per case (see cross_entropy._compiled)
    return torch.compile(_torch, backend=COMPILE_BACKEND, dynamic=False)


def _fusedls(backend: str):
    def call(x, dim):
        with fusedls.use_backend(backend):
            return fusedls.vector_norm(x, ORD, dim)

    return call




class _Inputs:
    """x (never modified), a grad-requiring copy, the upstream gradient and the float64 norms."""

    def __init__(self, case: Case, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.cols)
        if case.rows == 1:
            width = SPLIT_WIDTH if case.cols % SPLIT_WIDTH == 0 else case.cols
            shape = (case.cols // width, width)
        else:
            shape = (case.rows, case.cols)
        self.x = torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype)
        self.dim = None if case.rows == 1 else -1
        self.xg = self.x.detach().clone().requires_grad_()
        self.norm64 = torch.linalg.vector_norm(self.x.double(), ORD, self.dim)
        self.up = torch.randn(self.norm64.shape, generator=gen, device=device, dtype=case.torch_dtype)

    def reference_grad(self) -> torch.Tensor:
        factor = self.up.double() / self.norm64
        return self.x.double() * (factor if self.dim is None else factor[:, None])


class VectorNormBench(OpBench):
    name = "vector_norm"
    cols_key, cols_label = "cols", "N"
    byte_model = BYTE_MODEL
    workload = (
        f"ord-{ORD} norm of randn x: (R, N) along dim=-1 for R > 1; R = 1: N elements shaped "
        f"(N/{SPLIT_WIDTH}, {SPLIT_WIDTH}), dim=None; bwd / fwd+bwd: randn upstream gradient, x.grad cleared "
        "before each call (untimed), bwd's forward untimed"
    )
    check_method = (
        "norms, and for bwd / fwd+bwd the gradient of x, against torch in float64 on the same rounded input, as "
        "a fraction of fusedls.testing.tolerance(dtype)"
    )
    sweeps = {
        "cuda": [
            Slice(("fwd", "fwd+bwd"), ("bf16",), (4096, 16384), (1024, 4096, 8192)),
            Slice(("fwd", "fwd+bwd"), ("bf16", "fp32"), (1,), (1 << 24, 1 << 28)),
            Slice(("bwd",), ("bf16",), (16384,), (4096,)),
            Slice(("fwd", "fwd+bwd"), ("fp32",), (16384,), (4096,)),
        ],
        "cuda-quick": [
            Slice(("fwd", "fwd+bwd"), ("bf16",), (16384,), (4096,)),
            Slice(("fwd", "fwd+bwd"), ("bf16",), (1,), (1 << 28,)),
        ],
        "cpu": [
            Slice(("fwd", "fwd+bwd"), ("fp32", "bf16"), (1024,), (2048,)),
            Slice(("fwd", "fwd+bwd"), ("fp32",), (1,), (1 << 22,)),
        ],
        "cpu-quick": [
            Slice(("fwd+bwd",), ("fp32",), (256,), (2048,)),
            Slice(("fwd",), ("fp32",), (1,), (1 << 20,)),
        ],
    }

    def bytes(self, case: Case) -> int:
        return TRAFFIC[case.mode] * case.numel * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        backends = [b.name for b in fusedls.backends()]
        ours = [Provider(f"fusedls/{b}", "fusedls", functools.partial(_fusedls, b),
                         functools.partial(backend_why_not, "vector_norm", b)) for b in backends]  # fmt: skip
        return [Provider("torch", "torch", lambda: _torch), Provider("torch.compile", "compile", _compiled), *ours]

    def prepare(self, case: Case, device: torch.device) -> _Inputs:
        return _Inputs(case, device)

    def copy_source(self, data: _Inputs) -> torch.Tensor:
        return data.x

    def check(self, fn, provider: Provider, case: Case, data: _Inputs) -> float:
        rtol, atol = (tolerance(case.torch_dtype)[k] for k in ("rtol", "atol"))
        call = functools.partial(fn, dim=data.dim)
        if case.mode == "fwd":
            return _error_ratio(call(data.x), data.norm64, rtol, atol)
        data.xg.grad = None
        out = call(data.xg)
        out.backward(data.up)
        grad_error = _error_ratio(data.xg.grad, data.reference_grad(), rtol, atol)
        errors = (_error_ratio(out, data.norm64, rtol, atol), grad_error)
        data.xg.grad = None
        return max(errors)

    def timed_call(self, fn, provider: Provider, case: Case, data: _Inputs):
        call = functools.partial(fn, dim=data.dim)
        if case.mode == "fwd":
            x = data.x
            return None, lambda: call(x)
        xg, up = data.xg, data.up

        def clear():
            xg.grad = None

        if case.mode == "fwd+bwd":
            return clear, lambda: call(xg).backward(up)
        held = []

        def forward_first():
            held.clear()
            clear()
            held.append(call(xg))

        return forward_first, lambda: held.pop().backward(up)


BENCH = VectorNormBench()
