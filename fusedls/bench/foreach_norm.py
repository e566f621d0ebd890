"""Multi-tensor cases and providers: ``foreach_norm``, ``clip_grad_norm``, ``l2_penalty`` and
``l1_penalty`` (one :class:`ForeachBench` each), on the parameter list of a Llama-like model or on
activation-sized tensors.

Workloads (``Case.cols`` is the hidden size d; ``Case.rows`` depends on the op's ``kind``):

- ``params`` (``rows`` = layers L): per layer q, k, v, o (d x d), gate, up (f x d), down (d x f)
  with f = 8d/3 rounded up to 256, two norm weights (d); plus the embedding and the LM head
  (32000 x d) and the final norm. d = 2048, L = 22 (TinyLlama) is 201 tensors, 1.26e9 elements.
- ``activations`` (op name ``foreach_norm_act``; ``rows`` = tensors): ``rows`` tensors of
  (8192, d), e.g. one per layer.

All the tensors are views into one flat buffer (as an optimizer's flat parameter store would
be), which is also the copy baseline's source.

Providers: ``torch._foreach_norm(ts, 2)``; ``torch.nn.utils.clip_grad_norm_(params, 1.0,
foreach=True)`` (``clip_grad_norm_within``: max_norm 1e30, a clip that clips nothing); for the penalties the Python loop ``sum(w.square().sum() for w in ws)`` (or
``w.abs()``) and its backward; against the fusedls function on every backend that can run here.

Byte model (s bytes per element, n elements in all): foreach_norm reads n s; clip_grad_norm reads
the gradients for the norm, then reads and writes them to scale (the coefficient depends on all
of them, so no scaling can start before every element is read): 3 n s; clip_grad_norm_within
(coef = 1, nothing to scale): n s; a penalty fwd+bwd reads the
weights (forward), reads them again and writes the gradients (backward): 3 n s. Copy baseline: read
+ write of the flat buffer (2 n s).

Check before timing: the norms / total norm / penalty and the clipped gradients or the penalty's
gradients against float64, as a fraction of ``fusedls.testing.tolerance(dtype)`` (relative to the
value, or for a sum to the sum of the magnitudes of its terms).
"""

from __future__ import annotations

import functools

import torch

import fusedls
from fusedls.testing import tolerance

from .core import Case, OpBench, Provider, Slice, backend_why_not

VOCAB, TOKENS, MAX_NORM = 32000, 8192, 1.0
WITHIN_MAX_NORM = 1e30  # clip_grad_norm_within: a max_norm no gradient norm reaches


def _param_shapes(layers: int, d: int) -> list[tuple[int, ...]]:
    f = -(-8 * d // 3 // 256) * 256
    layer = [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return [(VOCAB, d)] + layer * layers + [(d,), (VOCAB, d)]


def _shapes(kind: str, case: Case) -> list[tuple[int, ...]]:
    return _param_shapes(case.rows, case.cols) if kind == "params" else [(TOKENS, case.cols)] * case.rows


class _Inputs:
    """The tensors (views of ``flat``), a pristine copy for restoring, and gradient views."""

    def __init__(self, kind: str, case: Case, device: torch.device, with_grads: bool):
        shapes = _shapes(kind, case)
        sizes = [torch.Size(s).numel() for s in shapes]
        gen = torch.Generator(device=device).manual_seed(case.rows * 7919 + case.cols)
        self.flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=case.torch_dtype)
        self.tensors = [v.view(s) for v, s in zip(self.flat.split(sizes), shapes)]
        self.params = self.grads = self.backup = None
        if with_grads:  # clip: parameters whose .grad are views of self.flat
            self.backup = self.flat.clone()
            zero = torch.zeros((), device=device, dtype=case.torch_dtype)  # no memory for the values
            self.params = [torch.nn.Parameter(zero.expand(s)) for s in shapes]
            for p, g in zip(self.params, self.tensors):
                p.grad = g

    def restore(self) -> None:
        self.flat.copy_(self.backup)

    def leaves(self) -> list[torch.Tensor]:
        return [t.detach().requires_grad_() for t in self.tensors]


def _torch(op: str, max_norm: float | None):
    if op.startswith("foreach_norm"):
        return lambda data: torch._foreach_norm(data.tensors, 2)
    if max_norm is not None:
        return lambda data: torch.nn.utils.clip_grad_norm_(data.params, max_norm, foreach=True)
    term = torch.Tensor.square if op == "l2_penalty" else torch.Tensor.abs

    def loop(data):
        ws = data.leaves()
        total = sum(term(w).sum() for w in ws)
        total.backward()
        return total, [w.grad for w in ws]

    return loop


def _fusedls(op: str, max_norm: float | None, backend: str):
    def call(data):
        with fusedls.use_backend(backend):
            if op.startswith("foreach_norm"):
                return fusedls.foreach_norm(data.tensors)
            if max_norm is not None:
                return fusedls.clip_grad_norm_(data.params, max_norm)
            ws = data.leaves()
            total = (fusedls.l2_penalty if op == "l2_penalty" else fusedls.l1_penalty)(ws)
            total.backward()
            return total, [w.grad for w in ws]

    return call




def _ratio(actual, expected, scale, dtype) -> float:
    tol = tolerance(dtype)
    err = (actual.detach().double() - expected).abs() / (tol["atol"] + tol["rtol"] * scale)
    return float(err.nan_to_num(nan=float("inf")).max())


class ForeachBench(OpBench):
    cols_key, cols_label = "hidden", "d"
    check_method = (
        "norms / total / penalty and the clipped gradients or the penalty's gradients against float64, as a "
        "fraction of fusedls.testing.tolerance(dtype) (sums: relative to the sum of |terms|)"
    )

    def __init__(self, name: str, kind: str, traffic: int, mode: str, max_norm: float | None = None):
        # max_norm: a clip_grad_norm_ bench (None: a norm or a penalty)
        self.name, self.kind, self.traffic, self.mode, self.max_norm = name, kind, traffic, mode, max_norm
        what = "a Llama-like parameter list (rows = layers)" if kind == "params" else f"rows x ({TOKENS}, d) tensors"
        self.workload = f"{what}, d = hidden size; views of one flat randn buffer"
        self.byte_model = (f"s = bytes per element, n = elements in all; {mode}: {traffic} n s (see "
                           "fusedls/bench/foreach_norm.py); copy baseline: read + write of the flat buffer, 2 n s")
        rows = (22, 32) if kind == "params" else (8, 32)
        self.sweeps = {
            "cuda": [Slice((mode,), ("bf16", "fp32"), rows, (2048,))],
            "cuda-quick": [Slice((mode,), ("bf16",), rows[:1], (2048,))],
            "cpu": [Slice((mode,), ("fp32", "bf16"), (2,), (256,))],
            "cpu-quick": [Slice((mode,), ("fp32",), (2,), (128,))],
        }

    def _numel(self, case: Case) -> int:
        return sum(torch.Size(s).numel() for s in _shapes(self.kind, case))

    def bytes(self, case: Case) -> int:
        return self.traffic * self._numel(case) * case.torch_dtype.itemsize

    def copy_bytes(self, case: Case) -> int:
        return 2 * self._numel(case) * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        found = [Provider("torch", "torch", functools.partial(_torch, self.name, self.max_norm))]
        for backend in (b.name for b in fusedls.backends()):
            run = functools.partial(_fusedls, self.name, self.max_norm, backend)
            found.append(Provider(f"fusedls/{backend}", "fusedls", run,
                                  functools.partial(backend_why_not, "foreach_norm", backend)))  # fmt: skip
        return found

    def prepare(self, case: Case, device: torch.device) -> _Inputs:
        return _Inputs(self.kind, case, device, self.max_norm is not None)

    def copy_source(self, data: _Inputs) -> torch.Tensor:
        return data.flat

    def check(self, fn, provider: Provider, case: Case, data: _Inputs) -> float:
        dtype = case.torch_dtype
        if self.name.startswith("foreach_norm"):
            got = torch.stack(fn(data)).double()
            want = torch.stack([torch.linalg.vector_norm(t.double()) for t in data.tensors])
            return _ratio(got, want, want, dtype)
        if self.max_norm is not None:
            data.restore()
            norms = torch.stack([torch.linalg.vector_norm(t.double()) for t in data.tensors])
            want = torch.linalg.vector_norm(norms)
            coef = min(1.0, self.max_norm / (want.item() + 1e-6))
            errors = [_ratio(fn(data), want, want, dtype)]
            errors += [_ratio(g.flatten(), b.double() * coef, (b.double() * coef).abs(), dtype)
                       for g, b in zip(data.tensors, data.backup.split([t.numel() for t in data.tensors]))]
            data.restore()
            return max(errors)
        total, grads = fn(data)
        l2 = self.name == "l2_penalty"
        terms = sum((t.double().square() if l2 else t.double().abs()).sum() for t in data.tensors)
        errors = [_ratio(total, terms, terms, torch.float32 if dtype == torch.float32 else dtype)]
        for g, t in zip(grads, data.tensors):
            want = 2 * t.double() if l2 else t.double().sign()
            errors.append(_ratio(g, want, want.abs(), dtype))
        return max(errors)

    def timed_call(self, fn, provider: Provider, case: Case, data: _Inputs):
        if self.max_norm is not None:
            return data.restore, lambda: fn(data)
        return None, lambda: fn(data)


FOREACH_NORM = ForeachBench("foreach_norm", "params", 1, "fwd")
FOREACH_NORM_ACT = ForeachBench("foreach_norm_act", "activations", 1, "fwd")
CLIP_GRAD_NORM = ForeachBench("clip_grad_norm", "params", 3, "fwd", MAX_NORM)
# The same with max_norm above the norm (coef = 1): nothing needs to change, so the useful bytes
# are one read (n s); torch still reads, multiplies by 1 and writes (3 n s), fusedls skips that.
CLIP_GRAD_NORM_WITHIN = ForeachBench("clip_grad_norm_within", "params", 1, "fwd", WITHIN_MAX_NORM)
L2_PENALTY = ForeachBench("l2_penalty", "params", 3, "fwd+bwd")
L1_PENALTY = ForeachBench("l1_penalty", "params", 3, "fwd+bwd")
BENCH = FOREACH_NORM
