"""Linear cross-entropy (LM head + loss) cases and providers.

Workload: hidden ``(N, d)`` and head ``(V, d)`` (d = :data:`HIDDEN` per device: 4096, the
Llama-3 8B head, on GPU; 256 on CPU), no bias, class-id targets with ~1 % ignored (-100),
``label_smoothing=0.1``, ``reduction="mean"``; forward + backward (gradients of hidden and
weight), the gradients cleared before each call (untimed). Providers: the materialised torch
path ``F.cross_entropy(F.linear(h, W), t, label_smoothing=0.1)``, ``torch.compile`` of it,
torch's chunked path ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
(``torch.chunked``; torch >= 2.13, which takes it only without label smoothing: skipped here,
saying so), Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` when it imports (CUDA only), and
``fusedls.linear_cross_entropy`` on every fusedls backend, with the default ``strategy="auto"``
(``fusedls/<backend>``), and forced to ``"tokens"`` / ``"vocab"`` (``fusedls/<backend>+tokens``,
``+vocab``). The same workload without label smoothing (providers ending in ``(eps=0)``, each
compared with ``torch (eps=0)``) puts torch's chunked path next to torch's materialised path and
fusedls's default. The figure of merit is the peak memory (``peak_bytes``, ``memory_vs_torch``) at
a time close to torch's.

Check before timing, against float64 computed chunk by chunk on the same rounded inputs: the
loss, the hidden gradient of <= 64 spread-out rows and the weight gradient of <= 64 spread-out
classes (all tokens summed), within ``fusedls.testing.tolerance(dtype)``'s rtol; gradients with an
absolute part of rtol x their largest |element| (their sums over tokens cancel).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fusedls
from fusedls.ops.linear_cross_entropy import STRATEGIES

from .core import Case, OpBench, Provider, Slice, backend_why_not
from .cross_entropy import _error_ratio, _liger_import_error
from fusedls.testing import tolerance

SMOOTHING, IGNORE_INDEX, IGNORE_FRACTION = 0.1, -100, 0.01
HIDDEN = {"cuda": 4096, "cpu": 256}  # d per device type
COMPILE_BACKEND = "inductor"
CHECKED = 64  # rows of grad_hidden and classes of grad_weight compared with float64
FILTER_EPS = 1e-5  # filter_eps of the fusedls/<backend>+fused+filter providers
BYTE_MODEL = "s = bytes per element; read h (N d s) and W (V d s), write their gradients: 2 (N + V) d s"


# A trained-like, peaked distribution of logits (peaked_inputs): per token a top class at about
# PEAK above a background of standard deviation about NOISE, RUNNERS_UP classes at RUNNER_UP;
# the target is the top class with probability TOP_TARGET, a runner-up with RUNNER_UP_TARGET,
# else uniform. Top classes and runners-up are drawn Zipf(ZIPF) over the class ids (id = rank:
# frequent tokens have small ids, as BPE vocabularies roughly do), or uniformly with zipf=0.
PEAK, RUNNER_UP, RUNNERS_UP, NOISE = 20.0, 12.0, 3, 1.0
TOP_TARGET, RUNNER_UP_TARGET, ZIPF = 0.8, 0.15, 1.1


def peaked_inputs(n_rows: int, n_cols: int, d: int, dtype: torch.dtype, device, zipf: float = ZIPF, seed: int = 0):
    """``(hidden, weight, target)`` whose logits ``hidden @ weight.T`` follow the peaked
    distribution above: ``weight`` rows of unit norm (N(0, 1/d) entries), ``hidden_n = PEAK W_top
    + RUNNER_UP sum_j W_j + NOISE * xi`` (``xi`` N(0, 1) entries); the background logits have
    standard deviation ``sqrt((PEAK^2 + RUNNERS_UP RUNNER_UP^2) / d + NOISE^2)``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_cols, d, generator=gen) / d**0.5
    ranks = torch.arange(1, n_cols + 1, dtype=torch.float64)
    probs = ranks ** -zipf if zipf else torch.ones_like(ranks)
    picks = torch.multinomial(probs, n_rows * (1 + RUNNERS_UP), replacement=True, generator=gen)
    top, others = picks[:n_rows], picks[n_rows:].view(n_rows, RUNNERS_UP)
    h = PEAK * w[top] + RUNNER_UP * w[others].sum(1) + NOISE * torch.randn(n_rows, d, generator=gen)
    u = torch.rand(n_rows, generator=gen)
    target = torch.where(u < TOP_TARGET, top, torch.randint(0, n_cols, (n_rows,), generator=gen))
    runner = (u >= TOP_TARGET) & (u < TOP_TARGET + RUNNER_UP_TARGET)
    target = torch.where(runner, others[:, 0], target)
    return h.to(dtype).to(device), w.to(dtype).to(device), target.to(device)


EPS0 = " (eps=0)"  # the suffix of the providers of the workload without label smoothing


def _smoothing(provider: Provider) -> float:
    return 0.0 if provider.name.endswith(EPS0) else SMOOTHING


def _torch_loss(h, w, t, smoothing=SMOOTHING):
    return F.cross_entropy(F.linear(h, w), t, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)


def _torch_chunked(smoothing=SMOOTHING):
    options = torch.nn.LinearCrossEntropyOptions()  # torch's defaults: its automatic chunks and precision
    return lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, label_smoothing=smoothing,
                                                  options=options)  # fmt: skip


def _torch_chunked_why_not(smoothing: float, case: Case, device: torch.device) -> str:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    if smoothing != 0.0:
        return ("torch's chunked path refuses label_smoothing != 0 (it warns and runs the materialised path "
                "instead, the torch row)")  # fmt: skip
    return ""


def _compiled():
    torch.compiler.reset()
    return torch.compile(_torch_loss, backend=COMPILE_BACKEND, dynamic=False)


def _fusedls(backend: str, strategy: str = "auto", smoothing: float = SMOOTHING, filter_eps=None):
    def loss(h, w, t):
        with fusedls.use_backend(backend):
            return fusedls.linear_cross_entropy(
                h, w, t, ignore_index=IGNORE_INDEX, label_smoothing=smoothing, strategy=strategy, filter_eps=filter_eps
            )

    return loss


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING)
    return lambda h, w, t: module(w, h, t)


def _liger_why_not(case: Case, device: torch.device) -> str:
    return "Liger-Kernel runs on CUDA only" if device.type != "cuda" else _liger_import_error()


class _Inputs:
    """A case's hidden states and head (leaves that require grad), targets and float64 reference."""

    def __init__(self, case: Case, device: torch.device):
        d = HIDDEN.get(device.type, HIDDEN["cpu"])
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.cols)
        dtype = case.torch_dtype
        self.h = torch.randn(case.rows, d, generator=gen, device=device, dtype=dtype).requires_grad_()
        # logits of a few units, as a trained head gives
        self.w = (torch.randn(case.cols, d, generator=gen, device=device) * (2 / d**0.5)).to(dtype).requires_grad_()
        target = torch.randint(0, case.cols, (case.rows,), generator=gen, device=device)
        ignored = torch.rand(case.rows, generator=gen, device=device) < IGNORE_FRACTION
        ignored[case.rows // 2] = True
        self.target = target.masked_fill(ignored, IGNORE_INDEX)
        self.rows = torch.linspace(0, case.rows - 1, min(CHECKED, case.rows), device=device).long()
        self.cols = torch.linspace(0, case.cols - 1, min(CHECKED, case.cols), device=device).long()
        self.refs = {}

    def ref(self, smoothing: float):
        """The float64 reference of the workload with ``smoothing``, computed on first use."""
        if smoothing not in self.refs:
            self.refs[smoothing] = _reference(self.h.detach(), self.w.detach(), self.target, self.rows, self.cols,
                                              smoothing)  # fmt: skip
        return self.refs[smoothing]

    def clear(self) -> None:
        self.h.grad = self.w.grad = None


def _reference(h, w, target, rows, cols, smoothing, chunk: int = 256):
    """float64 (loss, grad_hidden[rows], grad_weight[cols]) of the mean smoothed loss, by chunks."""
    h64, w64 = h.double(), w.double()
    n_valid = (target != IGNORE_INDEX).sum().double()
    n_cols = w.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    grad_w = torch.zeros(len(cols), w.shape[1], dtype=torch.float64, device=h.device)
    grad_h = torch.zeros(len(rows), w.shape[1], dtype=torch.float64, device=h.device)
    for start in range(0, h.shape[0], chunk):
        x = h64[start : start + chunk] @ w64.T
        t = target[start : start + chunk]
        valid = (t != IGNORE_INDEX).double()
        logp = torch.log_softmax(x, 1)
        y = t.clamp_min(0)
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        total += (((1 - smoothing) * nll - smoothing / n_cols * logp.sum(1)) * valid).sum()
        g = logp.exp() - smoothing / n_cols
        g[torch.arange(len(t), device=h.device), y] -= 1 - smoothing
        g *= valid[:, None] / n_valid
        grad_w += g[:, cols].T @ h64[start : start + chunk]
        here = (rows >= start) & (rows < start + len(t))
        grad_h[here] = g[rows[here] - start] @ w64
    return total / n_valid, grad_h, grad_w


class LinearCrossEntropyBench(OpBench):
    name = "linear_cross_entropy"
    cols_key, cols_label = "vocab", "V"
    byte_model = BYTE_MODEL
    workload = (
        f"hidden (N, d) randn, head (V, d) (d = {HIDDEN['cuda']} on GPU, {HIDDEN['cpu']} on CPU), no bias; "
        f"class-id targets, ~{IGNORE_FRACTION:.0%} ignored; label_smoothing={SMOOTHING} (0 for the providers "
        f"ending in{EPS0}, compared with 'torch{EPS0}'), reduction=mean; forward + backward (hidden and weight "
        "gradients), gradients cleared before each call (untimed)"
    )
    check_method = (
        f"loss, grad_hidden of <= {CHECKED} rows and grad_weight of <= {CHECKED} classes against float64 on the "
        "same rounded inputs; rtol of fusedls.testing.tolerance(dtype), gradients with atol = rtol x max |element|"
    )
    sweeps = {
        "cuda": [Slice(("fwd+bwd",), ("bf16",), (4096, 16384), (32000, 128256))],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (16384,), (128256,))],
        "cpu": [Slice(("fwd+bwd",), ("fp32",), (2048,), (32000,))],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32",), (1024,), (32000,))],
    }

    def bytes(self, case: Case) -> int:
        d = HIDDEN["cuda" if torch.cuda.is_available() else "cpu"]
        return 2 * (case.rows + case.cols) * d * case.torch_dtype.itemsize

    def copy_bytes(self, case: Case) -> int:
        return self.bytes(case)

    def providers(self) -> list[Provider]:
        found = [
            Provider("torch", "torch", lambda: _torch_loss),
            Provider("torch.compile", "compile", _compiled),
            Provider("torch.chunked", "torch", _torch_chunked, functools.partial(_torch_chunked_why_not, SMOOTHING)),
            Provider("liger", "external", _liger, _liger_why_not),
        ]
        for strategy in STRATEGIES:  # fusedls/<backend> (auto, the default), then +tokens, +vocab
            for backend in (b.name for b in fusedls.backends()):
                found.append(Provider(
                    f"fusedls/{backend}" + ("" if strategy == "auto" else f"+{strategy}"), "fusedls",
                    functools.partial(_fusedls, backend, strategy), functools.partial(backend_why_not, "cross_entropy", backend),
                ))  # fmt: skip
        for backend in (b.name for b in fusedls.backends()):  # the fused path with its gradient filter
            found.append(Provider(
                f"fusedls/{backend}+fused+filter", "fusedls", functools.partial(_fusedls, backend, "fused", SMOOTHING,
                FILTER_EPS), functools.partial(backend_why_not, "cross_entropy", backend),
            ))  # fmt: skip
        # without label smoothing, where torch's chunked path runs: next to torch and fusedls's default
        found += [
            Provider("torch" + EPS0, "torch", lambda: functools.partial(_torch_loss, smoothing=0.0)),
            Provider("torch.chunked" + EPS0, "torch", functools.partial(_torch_chunked, 0.0),
                     functools.partial(_torch_chunked_why_not, 0.0)),
            Provider("fusedls" + EPS0, "fusedls", functools.partial(_fusedls, "auto", "auto", 0.0)),
        ]  # fmt: skip
        return found

    def prepare(self, case: Case, device: torch.device) -> _Inputs:
        return _Inputs(case, device)

    def copy_source(self, data: _Inputs) -> torch.Tensor:
        return data.w.detach()

    def check(self, fn, provider: Provider, case: Case, data: _Inputs) -> float:
        ref_loss, ref_gh, ref_gw = data.ref(_smoothing(provider))
        rtol = tolerance(case.torch_dtype)["rtol"]
        data.clear()
        loss = fn(data.h, data.w, data.target)
        loss.backward()
        errors = (
            _error_ratio(loss, ref_loss, rtol, 0.0),
            _error_ratio(data.h.grad[data.rows], ref_gh, rtol, rtol * float(ref_gh.abs().max())),
            _error_ratio(data.w.grad[data.cols], ref_gw, rtol, rtol * float(ref_gw.abs().max())),
        )
        data.clear()
        return max(errors)

    def extras(self, provider: Provider, case: Case, data: _Inputs) -> dict:
        """The eps=0 rows' speed-up and memory are against torch's eps=0 row."""
        return {"reference": "torch" + EPS0} if provider.name.endswith(EPS0) else {}

    def timed_call(self, fn, provider: Provider, case: Case, data: _Inputs):
        return data.clear, lambda: fn(data.h, data.w, data.target).backward()


BENCH = LinearCrossEntropyBench()
