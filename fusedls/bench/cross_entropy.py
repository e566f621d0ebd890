"""Cross-entropy cases and providers: everything the benchmark knows about this op is here.

Workload: ``(R, V)`` logits, class-id targets with ~1 % ignored (-100), ``label_smoothing=0.1``,
``reduction="mean"``. Providers: torch eager ``nn.CrossEntropyLoss(label_smoothing=0.1)``,
``torch.compile`` of that same module (compiled per case for its static shape, on the first,
untimed call), Liger-Kernel's ``LigerCrossEntropyLoss(label_smoothing=0.1)`` when it imports
(CUDA only; it writes the gradient into the logits), quack's ``quack.cross_entropy.cross_entropy``
(``quack-kernels``, CuTe DSL; CUDA sm_90+, with ``inplace_backward=True``) when it imports: it has
no label smoothing, so it runs (and is checked) at ``label_smoothing=0`` on the same bytes, and
``fusedls.cross_entropy`` on every
fusedls backend, with and without ``inplace_backward``. Backends that cannot run here are
reported with fusedls's own reason.

Check before timing: the loss (and, for bwd / fwd+bwd, the gradient of up to 128 spread-out
rows plus an ignored one) against torch in float64 on the same rounded input
(``fusedls.testing.reference_cross_entropy``), within ``fusedls.testing.tolerance(dtype)``;
for the gradient, whose elements are far below the table's atol, the absolute part is rtol of the
mean |gradient| instead (see ``check``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

import fusedls
from fusedls.testing import reference_cross_entropy, tolerance

from .core import Case, OpBench, Provider, Slice, backend_why_not

SMOOTHING, IGNORE_INDEX, IGNORE_FRACTION = 0.1, -100, 0.01
VOCABS = (32000, 50257, 128256, 152064, 256000)  # Llama-2, GPT-2, Llama-3, Qwen2.5, Gemma-2
UNSMOOTHED = ("quack",)  # providers without label smoothing: they run, and are checked, at 0
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in a cheaper one
# The timed call's least traffic in units of R*V*s (s = bytes per logits element).
TRAFFIC = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}
BYTE_MODEL = (
    "s = bytes per logits element; fwd: read R*V*s; bwd: write R*V*s (the gradient, the least any "
    "backward can do; fusedls and Liger compute it during forward, so their bwd is only a rescale); "
    "fwd+bwd: read + write R*V*s; copy baseline: read + write R*V*s"
)


def _loss_module(cls) -> torch.nn.Module:
    return cls(label_smoothing=SMOOTHING, ignore_index=IGNORE_INDEX)


def _compiled() -> torch.nn.Module:
    # A fresh compilation per case, for its static shape; without the reset, dynamo would
    # fall back to eager after its recompile limit in a long sweep.
    torch.compiler.reset()
    return torch.compile(_loss_module(torch.nn.CrossEntropyLoss), backend=COMPILE_BACKEND, dynamic=False)


def _fusedls(backend: str, inplace: bool):
    def loss(x, target):
        with fusedls.use_backend(backend):
            return fusedls.cross_entropy(
                x, target, ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING, inplace_backward=inplace
            )

    return loss


def _backend_why_not(backend: str, inplace: bool, case: Case, device: torch.device) -> str:
    if inplace and case.mode == "fwd":
        return "inplace_backward only acts when a gradient is computed"
    return backend_why_not("cross_entropy", backend, case, device)


@functools.lru_cache(maxsize=None)
def _import_error(module: str, name: str, package: str) -> str:
    """Why the optional ``module`` (of pip's ``package``) cannot be used here, or ""."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{name} is not installed (optional; pip install {package})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken optional install must not stop the run
        return f"{name} failed to import: {type(exc).__name__}: {exc}"
    return ""


def _liger_import_error() -> str:
    return _import_error("liger_kernel.transformers", "Liger-Kernel", "liger-kernel")


def _liger_why_not(case: Case, device: torch.device) -> str:
    return "Liger-Kernel runs on CUDA only" if device.type != "cuda" else _liger_import_error()


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return _loss_module(LigerCrossEntropyLoss)


def _quack_why_not(case: Case, device: torch.device) -> str:
    if device.type != "cuda":
        return "quack runs on CUDA only"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "quack's kernels need sm_90 or newer"
    return _import_error("quack.cross_entropy", "quack", "quack-kernels")


def _quack():
    from quack.cross_entropy import cross_entropy

    def loss(x, target):  # no label smoothing in quack: checked against label_smoothing=0
        return cross_entropy(x, target, ignore_index=IGNORE_INDEX, reduction="mean", inplace_backward=True)

    return loss


class _Inputs:
    """A case's logits ``x0`` (never modified), targets, reference, and a lazily made scratch copy."""

    def __init__(self, case: Case, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.cols)
        self.x0 = torch.randn(case.rows, case.cols, generator=gen, device=device, dtype=case.torch_dtype)
        target = torch.randint(0, case.cols, (case.rows,), generator=gen, device=device)
        ignored = torch.rand(case.rows, generator=gen, device=device) < IGNORE_FRACTION
        ignored[case.rows // 2] = True  # at least one ignored row
        self.target = target.masked_fill(ignored, IGNORE_INDEX)
        self.ref = _reference(self.x0, self.target)
        self._scratch: torch.Tensor | None = None

    @functools.cached_property
    def ref_unsmoothed(self):
        """The reference at label_smoothing=0 (providers without smoothing)."""
        return _reference(self.x0, self.target, smoothing=0.0)

    def scratch(self, requires_grad: bool) -> torch.Tensor:
        """The working copy calls that need a fresh input get; restore() refills it."""
        if self._scratch is None or self._scratch.requires_grad != requires_grad:
            self._scratch = None
            self._scratch = torch.empty_like(self.x0).requires_grad_(requires_grad)
        return self._scratch

    def restore(self) -> None:
        self._scratch.grad = None
        self._scratch.detach().copy_(self.x0)


def _reference(x0: torch.Tensor, target: torch.Tensor, max_rows: int = 128, chunk: int = 256,
               smoothing: float = SMOOTHING):  # fmt: skip
    """(float64 loss over every row, checked rows, their float64 gradient); chunked to bound memory."""
    n_valid = (target != IGNORE_INDEX).sum().double()
    args = dict(ignore_index=IGNORE_INDEX, label_smoothing=smoothing, reduction="sum")
    total = sum(
        reference_cross_entropy(x0[i : i + chunk], target[i : i + chunk], **args)[0]
        for i in range(0, x0.shape[0], chunk)
    )
    rows = torch.linspace(0, x0.shape[0] - 1, min(max_rows, x0.shape[0]), device=x0.device).long()
    rows = torch.cat([rows, (target == IGNORE_INDEX).nonzero().flatten()[:1]]).unique()
    _, grad, _ = reference_cross_entropy(x0[rows].requires_grad_(), target[rows], **args)
    return total / n_valid, rows, grad / n_valid


def _error_ratio(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol |e|): <= 1 passes; NaN counts as infinitely wrong."""
    diff = (actual.detach().double() - expected).abs() / (atol + rtol * expected.abs())
    return float(diff.nan_to_num(nan=float("inf"), posinf=float("inf")).max())


class CrossEntropyBench(OpBench):
    name = "cross_entropy"
    cols_key, cols_label = "vocab", "V"
    byte_model = BYTE_MODEL
    workload = (
        f"(R, V) logits, randn; class-id targets, ~{IGNORE_FRACTION:.0%} ignored ({IGNORE_INDEX}); "
        f"label_smoothing={SMOOTHING}, reduction=mean; bwd/fwd+bwd: logits restored and x.grad cleared "
        "before each call (untimed), bwd's forward untimed"
    )
    check_method = (
        "loss, and for bwd / fwd+bwd the gradient of <= 128 spread-out rows and an ignored one, against "
        "torch in float64 on the same rounded input; error as a fraction of fusedls.testing.tolerance(dtype) "
        "(gradient: rtol x (|element| + mean |gradient|))"
    )
    sweeps = {
        "cuda": [
            Slice(("fwd+bwd",), ("bf16",), (1024, 4096, 16384, 65536), VOCABS),
            Slice(("fwd", "bwd"), ("bf16",), (16384,), VOCABS),
            Slice(("fwd+bwd",), ("fp16", "fp32"), (16384,), VOCABS),
        ],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (4096,), (32000, 128256))],
        "cpu": [
            Slice(("fwd+bwd",), ("fp32", "bf16"), (1024,), VOCABS[:3]),
            Slice(("fwd", "bwd"), ("fp32",), (1024,), VOCABS[:3]),
        ],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32", "bf16"), (256,), VOCABS[:2])],
    }

    def bytes(self, case: Case) -> int:
        return TRAFFIC[case.mode] * case.numel * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        found = [
            Provider("torch", "torch", lambda: _loss_module(torch.nn.CrossEntropyLoss)),
            Provider("torch.compile", "compile", _compiled),
            Provider("liger", "external", _liger, _liger_why_not, mutates_input=True),
            Provider("quack", "external", _quack, _quack_why_not, mutates_input=True),
        ]
        for backend in (b.name for b in fusedls.backends()):
            for inplace in (False, True):
                found.append(Provider(
                    f"fusedls/{backend}{'+inplace' if inplace else ''}", "fusedls",
                    functools.partial(_fusedls, backend, inplace),
                    functools.partial(_backend_why_not, backend, inplace), mutates_input=inplace,
                ))  # fmt: skip
        return found

    def prepare(self, case: Case, device: torch.device) -> _Inputs:
        return _Inputs(case, device)

    def copy_source(self, data: _Inputs) -> torch.Tensor:
        return data.x0

    def check(self, fn, provider: Provider, case: Case, data: _Inputs) -> float:
        ref_loss, rows, ref_grad = data.ref_unsmoothed if provider.name in UNSMOOTHED else data.ref
        rtol, atol = (tolerance(case.torch_dtype)[k] for k in ("rtol", "atol"))  # the tests' table
        if case.mode == "fwd":  # what is timed: the loss of logits that do not require grad
            if provider.mutates_input:
                x = data.scratch(requires_grad=False)
                data.restore()
            else:
                x = data.x0
            return _error_ratio(fn(x, data.target), ref_loss, rtol, atol)
        x = data.scratch(requires_grad=True)
        data.restore()
        loss = fn(x, data.target)
        loss.backward()
        # Gradient elements are ~1/(R V), far below the table's atol, and p - eps/V cancels in
        # many of them: an fp32 error of ~1e-7 p is then large against |p - eps/V|. So the
        # absolute part is rtol of the mean |gradient| (a wrong gradient is off by about that
        # much), plus one subnormal step of the dtype (fp16 gradients of large cases are subnormal).
        finfo = torch.finfo(case.torch_dtype)
        grad_atol = rtol * float(ref_grad.abs().mean()) + finfo.smallest_normal * finfo.eps
        errors = (_error_ratio(loss, ref_loss, rtol, atol), _error_ratio(x.grad[rows], ref_grad, rtol, grad_atol))
        x.grad = None
        return max(errors)

    def timed_call(self, fn, provider: Provider, case: Case, data: _Inputs):
        target = data.target
        if case.mode == "fwd":
            if not provider.mutates_input:
                return None, lambda: fn(data.x0, target)
            x = data.scratch(requires_grad=False)
            return data.restore, lambda: fn(x, target)
        x = data.scratch(requires_grad=True)
        if case.mode == "fwd+bwd":
            return data.restore, lambda: fn(x, target).backward()
        held = []

        def forward_first():
            held.clear()
            data.restore()
            held.append(fn(x, target))

        return forward_first, lambda: held.pop().backward()


BENCH = CrossEntropyBench()
