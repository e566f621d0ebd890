"""Dropout cases and providers: ``dropout``, ``dropout_add`` and ``dropout_add_rms_norm``.

Three ops of the suite, one :class:`DropoutBench` each (``DROPOUT``, ``DROPOUT_ADD``,
``DROPOUT_ADD_RMS_NORM``), all on an ``(R, N)`` activation (rows x hidden size) with p = 0.1:

- ``dropout``: ``fusedls.dropout(x, 0.1)`` against ``F.dropout(x, 0.1)``;
- ``dropout_add``: ``fusedls.dropout_add(x, residual, 0.1)`` against ``residual + F.dropout(x, 0.1)``;
- ``dropout_add_rms_norm``: ``fusedls.dropout_add_rms_norm(x, residual, weight, 0.1)`` against
  ``h = residual + F.dropout(x, 0.1); y = F.rms_norm(h, (N,), weight, eps)``, both returning
  ``(y, h)``; backward feeds a gradient to both (``h`` is the next block's residual stream).

Providers: torch eager (the reference for speed-up and memory), ``torch.compile`` of the same
composition (compiled per case for its static shape on the first, untimed call) and the fusedls op
on every fusedls backend that can run here (same rule as cross-entropy: a backend that cannot run,
or that ``auto`` would not pick for this device and dtype, is listed with the reason).

Byte model (``s`` bytes per element, ``n = R*N``; the weight, ``N*s``, is negligible):

======================  =============================  =====================================  =========
op                      fwd                            bwd                                    fwd+bwd
======================  =============================  =====================================  =========
dropout                 read x, write y: 2ns           read dy, write dx: 2ns                 4ns
dropout_add             read x, residual, write: 3ns   read dout, write dx: 2ns (dresidual    5ns
                                                       is dout itself, no traffic)
dropout_add_rms_norm    read x, residual, write y, h:  read dy, dh_next, h, write dx,         9ns
                        4ns                            dresidual: 5ns
======================  =============================  =====================================  =========

The copy baseline is read + write of x (2ns). No mask is stored by fusedls (backward regenerates
it), so the peak memory of ``fwd+bwd`` (one call: forward and backward) shows torch's mask.

Check before timing, with the timed p = 0.1: randomness differs between providers (and
``fusedls.dropout`` / ``dropout_add`` at p = 0 return without any kernel, so a p = 0 comparison
would check nothing), so the mask each provider used is recovered from its output (an element is
kept iff its output is nearer ``residual + x/(1-p)`` than ``residual``; with a backward,
iff its gradient dx is not 0) and the outputs and the
gradients of x and residual (and weight) are compared with the float64 composition under that
mask, within ``fusedls.testing.tolerance(dtype)``. The kept fraction must also be within 6
standard deviations of 1 - p, so a provider that drops nothing (or everything) fails.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import fusedls
from fusedls.testing import tolerance

from .core import Case, OpBench, Provider, Slice, backend_why_not

P, EPS = 0.1, 1e-6
HIDDEN = (2048, 4096, 8192)
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in a cheaper one
# Least traffic of each mode in units of n*s, per op (see the module docstring).
TRAFFIC = {
    "dropout": {"fwd": 2, "bwd": 2, "fwd+bwd": 4},
    "dropout_add": {"fwd": 3, "bwd": 2, "fwd+bwd": 5},
    "dropout_add_rms_norm": {"fwd": 4, "bwd": 5, "fwd+bwd": 9},
}
BYTE_MODEL = {
    "dropout": "s = bytes per element, n = R*N; fwd: read x + write y = 2ns; bwd: read dy + write dx = 2ns; "
    "fwd+bwd: 4ns; copy baseline: read + write x = 2ns",
    "dropout_add": "s = bytes per element, n = R*N; fwd: read x, residual + write out = 3ns; bwd: read dout + "
    "write dx = 2ns (dresidual is dout itself); fwd+bwd: 5ns; copy baseline: read + write x = 2ns",
    "dropout_add_rms_norm": "s = bytes per element, n = R*N, weight (N*s) neglected; fwd: read x, residual + "
    "write y, h = 4ns; bwd: read dy, dh_next, h + write dx, dresidual = 5ns; fwd+bwd: 9ns; copy baseline: "
    "read + write x = 2ns",
}


# ---------------------------------------------------------------------------- the compositions


def _torch_dropout(x, residual, weight):
    return F.dropout(x, P, training=True)


def _torch_dropout_add(x, residual, weight):
    return residual + F.dropout(x, P, training=True)


def _torch_dropout_add_rms_norm(x, residual, weight):
    h = residual + F.dropout(x, P, training=True)
    return F.rms_norm(h, (x.shape[-1],), weight, EPS), h


TORCH = {"dropout": _torch_dropout, "dropout_add": _torch_dropout_add,
         "dropout_add_rms_norm": _torch_dropout_add_rms_norm}  # fmt: skip


def _fusedls(op: str, backend: str):
    def call(x, residual, weight):
        with fusedls.use_backend(backend):
            if op == "dropout":
                return fusedls.dropout(x, P)
            if op == "dropout_add":
                return fusedls.dropout_add(x, residual, P)
            return fusedls.dropout_add_rms_norm(x, residual, weight, P, EPS)

    return call


def _compiled(op: str):
    torch.compiler.reset()  # a fresh compilation per case (see cross_entropy._compiled)
    return torch.compile(TORCH[op], backend=COMPILE_BACKEND, dynamic=False)


def _backend_why_not(op: str, backend: str, case: Case, device: torch.device) -> str:
    reason = backend_why_not("dropout", backend, case, device)
    if reason:
        return reason
    if op == "dropout_add_rms_norm" and backend == "triton":
        from fusedls.backend.triton.tuning import DROPOUT_NORM_MAX_N

        longest = DROPOUT_NORM_MAX_N.get(case.torch_dtype.itemsize, 0)
        if case.cols > longest:
            return (f"rows of {case.cols} {case.dtype} elements exceed the norm kernel's {longest} "
                    "(auto runs them eagerly)")
    return ""


# ---------------------------------------------------------------------------------- inputs


class _Inputs:
    """x, residual, weight (never modified), the upstream gradients, and grad-requiring views."""

    def __init__(self, op: str, case: Case, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.cols)
        shape, dtype = (case.rows, case.cols), case.torch_dtype
        self.x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.residual = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        self.weight = (1 + 0.1 * torch.randn(case.cols, generator=gen, device=device)).to(dtype)
        self.dy = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        norm = op == "dropout_add_rms_norm"
        self.dh = torch.randn(shape, generator=gen, device=device, dtype=dtype) if norm else None
        self.grad_args = tuple(t.detach().clone().requires_grad_() for t in (self.x, self.residual, self.weight))

    def clear_grads(self) -> None:
        for t in self.grad_args:
            t.grad = None

    def backward(self, out) -> None:
        if isinstance(out, tuple):
            torch.autograd.backward(out, (self.dy, self.dh))
        else:
            out.backward(self.dy)


def _error_ratio(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, scale=None) -> float:
    """max |a - e| / (atol + rtol * scale) with scale = |e| by default: <= 1 passes; NaN counts as
    infinitely wrong. A sum's error is relative to its terms, not to the sum: pass their magnitude."""
    scale = expected.abs() if scale is None else scale
    diff = (actual.detach().double() - expected.detach()).abs() / (atol + rtol * scale.detach())
    return float(diff.nan_to_num(nan=float("inf"), posinf=float("inf")).max()) if diff.numel() else 0.0


class DropoutBench(OpBench):
    cols_key, cols_label = "hidden", "N"
    check_method = (
        f"p = {P} (the timed p): the mask each provider used is recovered from its output and its outputs and "
        "gradients (x, residual, weight) are compared with the float64 composition under that mask, as a "
        "fraction of fusedls.testing.tolerance(dtype); the kept fraction must be within 6 sigma of 1 - p"
    )
    sweeps = {
        "cuda": [
            Slice(("fwd+bwd",), ("bf16",), (4096, 16384, 65536), HIDDEN),
            Slice(("fwd", "bwd"), ("bf16",), (16384,), HIDDEN),
        ],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (16384,), (2048, 8192))],
        "cpu": [
            Slice(("fwd+bwd",), ("fp32", "bf16"), (1024,), (2048,)),
            Slice(("fwd", "bwd"), ("fp32",), (1024,), (2048,)),
        ],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32",), (256,), (2048,))],
    }

    def __init__(self, name: str):
        self.name = name
        self.byte_model = BYTE_MODEL[name]
        uses = {"dropout": "x", "dropout_add": "x, residual", "dropout_add_rms_norm": "x, residual, weight"}[name]
        self.workload = (
            f"(R, N) randn {uses}, p = {P}" + (f", eps = {EPS}" if name == "dropout_add_rms_norm" else "")
            + "; bwd / fwd+bwd: randn upstream gradient(s), grads cleared before each call (untimed), bwd's "
            "forward untimed"
        )  # fmt: skip

    def bytes(self, case: Case) -> int:
        return TRAFFIC[self.name][case.mode] * case.numel * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        found = [
            Provider("torch", "torch", lambda: TORCH[self.name]),
            Provider("torch.compile", "compile", functools.partial(_compiled, self.name)),
        ]
        for backend in (b.name for b in fusedls.backends()):
            found.append(Provider(
                f"fusedls/{backend}", "fusedls", functools.partial(_fusedls, self.name, backend),
                functools.partial(_backend_why_not, self.name, backend),
            ))  # fmt: skip
        return found

    def prepare(self, case: Case, device: torch.device) -> _Inputs:
        return _Inputs(self.name, case, device)

    def copy_source(self, data: _Inputs) -> torch.Tensor:
        return data.x

    def check(self, fn, provider: Provider, case: Case, data: _Inputs) -> float:
        rtol, atol = (tolerance(case.torch_dtype)[k] for k in ("rtol", "atol"))
        args = data.grad_args if case.mode != "fwd" else (data.x, data.residual, data.weight)
        data.clear_grads()
        out = fn(*args)
        y, h = out if isinstance(out, tuple) else (None, out)
        x64, r64, w64 = (t.detach().double() for t in args)
        base = r64 if self.name != "dropout" else torch.zeros_like(x64)
        scaled = x64 / (1 - P)
        h64 = h.detach().double()
        keep = (h64 - base - scaled).abs() < (h64 - base).abs()
        # Where x/(1-p) is below h's rounding, kept and dropped give the same h, so when there is
        # a backward its mask is used (dx = dy * mask / (1-p); dy is randn, so never 0 in practice):
        # the check of h then also checks that forward and backward used the same mask.
        if case.mode != "fwd":
            data.backward(out)
            keep = torch.where(data.dy != 0, args[0].grad != 0, keep)
        sigma = math.sqrt(P * (1 - P) / keep.numel())
        terms = base.abs() + keep * scaled.abs()  # h = base + kept x/(1-p): its error scales with these
        errors = [_error_ratio(h, base + keep * scaled, rtol, atol, terms),
                  abs(keep.double().mean().item() - (1 - P)) / (6 * sigma)]  # fmt: skip
        # float64 composition under the recovered mask, with autograd for the gradients
        xr, rr, wr = (t.clone().requires_grad_() for t in (x64, r64, w64))
        h_ref = (rr if self.name != "dropout" else 0) + xr * keep / (1 - P)
        if y is not None:
            y_ref = F.rms_norm(h_ref, (case.cols,), wr, EPS)
            rstd = (h_ref.detach().square().mean(-1, keepdim=True) + EPS).rsqrt()
            errors.append(_error_ratio(y, y_ref, rtol, atol, y_ref.abs() + terms * rstd * w64.abs()))
        if case.mode != "fwd":
            ref_out = (y_ref, h_ref) if y is not None else h_ref
            ref_grads = (data.dy.double(),) + ((data.dh.double(),) if y is not None else ())
            torch.autograd.backward(ref_out, ref_grads)
            pairs = [(args[0].grad, xr.grad)]
            if self.name != "dropout":
                pairs.append((args[1].grad, rr.grad))
            if y is not None:
                pairs.append((args[2].grad, wr.grad))
            for got, want in pairs:
                if got is None:
                    return float("inf")
                # as cross-entropy's check: rtol x (|element| + mean |gradient|)
                errors.append(_error_ratio(got, want, rtol, atol, want.abs() + want.abs().mean()))
            data.clear_grads()
        return max(errors)

    def timed_call(self, fn, provider: Provider, case: Case, data: _Inputs):
        if case.mode == "fwd":
            x, r, w = data.x, data.residual, data.weight
            return None, lambda: fn(x, r, w)
        x, r, w = data.grad_args
        if case.mode == "fwd+bwd":
            return data.clear_grads, lambda: data.backward(fn(x, r, w))
        held = []

        def forward_first():
            held.clear()
            data.clear_grads()
            held.append(fn(x, r, w))

        return forward_first, lambda: data.backward(held.pop())


DROPOUT = DropoutBench("dropout")
DROPOUT_ADD = DropoutBench("dropout_add")
DROPOUT_ADD_RMS_NORM = DropoutBench("dropout_add_rms_norm")
OPS = {b.name: b for b in (DROPOUT, DROPOUT_ADD, DROPOUT_ADD_RMS_NORM)}
BENCH = DROPOUT
