"""End-to-end training steps of a transformers causal LM: unpatched vs ``fusedls.transformers.apply``.

    python -m fusedls.bench --op train_step [--quick] [--rows TOKENS ...] [--vocab V ...]

Workload: a Llama model from a random config (no download; :data:`SIZES` per device: on a GPU
Llama-3-8B's width with 2 decoder layers, on a CPU a tiny one), ``rows`` tokens per step (batches
of :data:`SIZES` ``seq`` tokens), a ``cols``-token vocabulary, untied head, sdpa attention, one
fixed batch with ~1 % of the labels ignored; one timed call is one optimizer step (forward with
``label_smoothing=0.1``, backward, AdamW step, gradients set to None). Providers, each on its own
model built from the same seed:

* ``torch``: the unpatched model as the Trainer runs it with ``label_smoothing_factor=0.1``: its
  logits through transformers' ``LabelSmoother`` (``shift_labels=True``);
* ``fusedls/<backend>``: the model patched by ``fusedls.transformers.apply(model,
  label_smoothing=0.1)``, labels passed to the forward, on that fusedls backend;
* ``liger``: where Liger-Kernel imports (CUDA only), its model patch with ``label_smoothing``
  passed through the forward's keyword arguments to its fused loss.

Check (also the warm-up): :data:`STEPS` optimizer steps from the same weights; the first step's loss
against float64 computed from the head's input in that step (the provider's own last hidden
states) and the head, within the dtype's tolerance. Each provider's row carries its loss curve
(``loss_curve``) and its largest relative distance from ``torch``'s (``curve_max_rel_diff``);
``train_step_loss.png`` plots the curves. Peak memory is the step's, above the parameters and the
optimizer state; ``python -m fusedls.bench.train_step_memory`` counts it at full size on meta
tensors.
"""

from __future__ import annotations

import functools

import torch

import fusedls

try:  # optional: without transformers every provider says so and the other ops still run
    import transformers
    from transformers.trainer_pt_utils import LabelSmoother

    from fusedls.transformers import apply
    from fusedls.transformers.configs import random_config

    _NO_TRANSFORMERS = ""
except ImportError:
    _NO_TRANSFORMERS = "transformers is not installed (pip install 'fusedls[transformers]')"

from .core import Case, OpBench, Provider, Slice, backend_why_not
from .cross_entropy import _error_ratio, _liger_import_error
from .linear_cross_entropy import IGNORE_FRACTION, IGNORE_INDEX, SMOOTHING, _reference
from fusedls.testing import tolerance

# Model sizes per device type: Llama-3-8B's width and head on a GPU (few layers: the head's share of
# a step is what changes), a tiny model on a CPU.
SIZES = {
    "cuda": dict(hidden_size=4096, intermediate_size=14336, heads=32, kv_heads=8, layers=2, seq=4096),
    "cpu": dict(hidden_size=64, intermediate_size=128, heads=4, kv_heads=2, layers=2, seq=128),
}
STEPS = 20  # optimizer steps of the loss curve (the check)
LR = 1e-3  # AdamW's learning rate: the curve visibly falls within STEPS on the fixed batch
SEED = 0


def model_config(device_type: str, vocab: int, **overrides):
    """The benchmark's Llama config for ``device_type`` and a ``vocab``-token vocabulary."""
    size = {**SIZES.get(device_type, SIZES["cpu"]), **overrides}
    return random_config("llama", vocab_size=vocab, hidden_size=size["hidden_size"], layers=size["layers"],
                         heads=size["heads"], kv_heads=size["kv_heads"], intermediate_size=size["intermediate_size"],
                         max_positions=size["seq"], tie_word_embeddings=False)  # fmt: skip


def build_model(config, dtype: torch.dtype, device, attention: str = "sdpa"):
    """The model of ``config`` with the benchmark's seeded random weights, in training mode."""
    torch.manual_seed(SEED)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention).train()


class _Data:
    """A case's config, batch, and what the providers' checks found."""

    def __init__(self, case: Case, device: torch.device):
        seq = min(SIZES.get(device.type, SIZES["cpu"])["seq"], case.rows)
        if case.rows % seq:
            raise ValueError(f"rows (tokens per step) must be a multiple of the sequence length {seq}")
        self.device, self.dtype = device, case.torch_dtype
        self.config = model_config(device.type, case.cols, seq=seq)
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.cols)
        self.ids = torch.randint(3, case.cols, (case.rows // seq, seq), generator=gen, device=device)
        ignored = torch.rand(self.ids.shape, generator=gen, device=device) < IGNORE_FRACTION
        self.labels = self.ids.masked_fill(ignored, IGNORE_INDEX)
        self.target = torch.nn.functional.pad(self.labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
        self.copy_src = torch.empty(case.cols, self.config.hidden_size, device=device, dtype=self.dtype)
        self.runner = None  # the provider being measured (the previous one is freed)
        self.curves: dict[str, list[float]] = {}
        self.reference = None  # float64 first-step loss, from the first provider whose head ran


class _Runner:
    """One provider's model and optimizer; :meth:`step` is one optimizer step."""

    def __init__(self, data: _Data, kind: str, backend: str | None = None):
        self.data, self.kind, self.backend = data, kind, backend
        self.model = build_model(data.config, data.dtype, data.device)
        if kind == "fusedls":
            apply(self.model, label_smoothing=SMOOTHING)
        elif kind == "liger":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.head_input = None

    def loss(self) -> torch.Tensor:
        data = self.data
        if self.kind == "torch":
            out = self.model(input_ids=data.ids)
            return LabelSmoother(epsilon=SMOOTHING)(out, data.labels, shift_labels=True)
        kwargs = {"label_smoothing": SMOOTHING} if self.kind == "liger" else {}
        with fusedls.use_backend(self.backend or "auto"):
            return self.model(input_ids=data.ids, labels=data.labels, **kwargs).loss

    def step(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def first_step_with_head_input(self) -> torch.Tensor:
        """One step, keeping the output embedding's input (the last hidden states) and its weight
        before the step, for the check."""
        hook = self.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: setattr(self, "head_input", (args[0].detach(), module.weight.detach().clone()))
        )  # fmt: skip
        try:
            return self.step()
        finally:
            hook.remove()


def _liger_why_not(case: Case, device: torch.device) -> str:
    return "Liger-Kernel runs on CUDA only" if device.type != "cuda" else _liger_import_error()


def _transformers_why_not(case: Case, device: torch.device) -> str:
    return _NO_TRANSFORMERS


def _runner_factory(kind: str, backend: str | None = None):
    return lambda data: _Runner(data, kind, backend)


def _fusedls_why_not(backend: str, case: Case, device: torch.device) -> str:
    return _transformers_why_not(case, device) or backend_why_not("cross_entropy", backend, case, device)


class TrainStepBench(OpBench):
    name = "train_step"
    cols_key, cols_label = "vocab", "V"
    byte_model = "s = bytes per element, P parameters: read every parameter and write its gradient, 2 P s"
    workload = (
        "Llama from a random config (GPU: hidden 4096, ffn 14336, 32/8 heads, 2 layers, seq 4096; CPU: hidden 64, "
        "2 layers, seq 128), rows = tokens per step, V = vocabulary; one AdamW step (forward with "
        f"label_smoothing={SMOOTHING}, backward, step, zero_grad) on a fixed batch, ~{IGNORE_FRACTION:.0%} of the "
        "labels ignored; torch = unpatched + transformers' LabelSmoother, fusedls = fusedls.transformers.apply"
    )
    check_method = (
        f"{STEPS} optimizer steps from the same weights (loss_curve); the first step's loss against float64 from "
        "the head's input in that step, rtol of fusedls.testing.tolerance(dtype)"
    )
    sweeps = {
        "cuda": [Slice(("fwd+bwd",), ("bf16",), (8192, 16384), (32000, 128256))],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (8192,), (128256,))],
        "cpu": [Slice(("fwd+bwd",), ("fp32",), (512,), (32000,))],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32",), (256,), (8000,))],
    }

    @staticmethod
    def _size() -> dict:
        return SIZES["cuda" if torch.cuda.is_available() else "cpu"]

    def bytes(self, case: Case) -> int:
        size = self._size()
        d, f = size["hidden_size"], size["intermediate_size"]
        kv = d * size["kv_heads"] // size["heads"]  # k and v projections' width
        params = 2 * case.cols * d + size["layers"] * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
        return 2 * params * case.torch_dtype.itemsize

    def copy_bytes(self, case: Case) -> int:
        return 2 * case.cols * self._size()["hidden_size"] * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        found = [Provider("torch", "torch", functools.partial(_runner_factory, "torch"), _transformers_why_not)]
        for backend in (b.name for b in fusedls.backends()):
            found.append(Provider(f"fusedls/{backend}", "fusedls", functools.partial(_runner_factory, "fusedls", backend),
                                  functools.partial(_fusedls_why_not, backend)))  # fmt: skip
        # last: Liger patches LlamaForCausalLM.forward on the class, which the models built after it share
        return found + [Provider("liger", "external", functools.partial(_runner_factory, "liger"), _liger_why_not)]

    def prepare(self, case: Case, device: torch.device) -> _Data:
        return _Data(case, device)

    def copy_source(self, data: _Data) -> torch.Tensor:
        return data.copy_src

    def check(self, fn, provider: Provider, case: Case, data: _Data) -> float:
        data.runner = None  # free the previous provider's model first
        runner = data.runner = fn(data)
        losses = [runner.first_step_with_head_input()] + [runner.step() for _ in range(STEPS - 1)]
        data.curves[provider.name] = torch.stack(losses).double().tolist()
        if runner.head_input is not None:  # (Liger's forward reads the head's weight without running it)
            h, head = runner.head_input
            h = h.reshape(-1, head.shape[1])
            runner.head_input = None
            empty = torch.zeros(0, dtype=torch.long, device=h.device)
            data.reference = _reference(h, head, data.target, empty, empty, SMOOTHING)[0]
        return _error_ratio(losses[0], data.reference, tolerance(case.torch_dtype)["rtol"], 0.0)

    def timed_call(self, fn, provider: Provider, case: Case, data: _Data):
        return None, data.runner.step

    def extras(self, provider: Provider, case: Case, data: _Data) -> dict:
        curve, ref = data.curves[provider.name], data.curves.get("torch")
        found = {"loss_curve": curve}
        if ref is not None and provider.name != "torch":
            found["curve_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
        return found

    def extra_files(self, out, meta: dict, rows: list[dict], plot: bool) -> list:
        return [path] if plot and (path := _plot_curves(out, meta, rows)) else []


def _plot_curves(out, meta: dict, rows: list[dict]):
    """``train_step_loss.png``: each case's loss curves, one line per provider (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys((r["dtype"], r["rows"], r["vocab"]) for r in rows if r.get("loss_curve")))
    if not cases:
        return None
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False, constrained_layout=True)
    for (dtype, tokens, vocab), ax in zip(cases, axes[0]):
        for r in rows:
            if (r["dtype"], r["rows"], r["vocab"]) == (dtype, tokens, vocab) and r.get("loss_curve"):
                ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], marker=".", label=r["provider"])
        ax.set_title(f"train_step {dtype}, {tokens} tokens/step, V={vocab}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"loss (label_smoothing={SMOOTHING})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, torch {meta['versions']['torch']}, {meta['date_utc'][:10]}, "
                 f"commit {meta['git_commit'][:8]}", fontsize=10)  # fmt: skip
    path = out / "train_step_loss.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


BENCH = TrainStepBench()
