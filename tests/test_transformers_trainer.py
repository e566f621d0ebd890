"""``fusedls.transformers.Trainer``: ``TrainingArguments(label_smoothing_factor=eps)`` through the
fused loss gives what transformers' own Trainer (its ``LabelSmoother`` on the logits) gives.

The reference is ``transformers.Trainer`` on a float64 copy of the model; the patched model runs in
fp32, or in float64 for a whole training run. Everything is compared within the fp32 tolerance:
``LabelSmoother`` sums the log-probabilities in fp32 (``dtype=torch.float32``) even for float64
logits.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fusedls.transformers as ft  # noqa: E402
import fusedls.transformers.patch as patch_module  # noqa: E402
from fusedls.testing import assert_close  # noqa: E402
from test_transformers import assert_grads_close, batch, tiny_model  # noqa: E402

EPS = 0.1


def _dataset(n: int = 8):
    ids, labels = batch(seed=3, rows=n, cols=10)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


def _trainer(cls, model, tmp_path, **args):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        label_smoothing_factor=EPS, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        logging_steps=1, **args,
    )  # fmt: skip
    return cls(model=model, args=arguments, train_dataset=_dataset())


@pytest.fixture
def fused_calls(monkeypatch):
    """How many losses the patched models computed through the fused path."""
    calls = []
    fused = patch_module.hidden_loss

    def counting(*args, **kwargs):
        calls.append(kwargs["options"].label_smoothing)
        return fused(*args, **kwargs)

    monkeypatch.setattr(patch_module, "hidden_loss", counting)
    return calls


def test_training_steps_match_label_smoother(tmp_path, fused_calls):
    """Two micro-batches of one accumulated batch (num_items_in_batch counts both): each step's loss
    and the accumulated gradients against transformers' Trainer."""
    model = tiny_model("llama")
    reference = copy.deepcopy(model).double()
    ft.apply(model)  # no smoothing of its own: the Trainer's label_smoothing_factor is used
    fused = _trainer(ft.Trainer, model, tmp_path)
    plain = _trainer(transformers.Trainer, reference, tmp_path)
    assert fused.model_accepts_loss_kwargs and plain.model_accepts_loss_kwargs
    data = _dataset()
    micro = [transformers.default_data_collator(data[i : i + 2]) for i in (0, 2)]
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    for inputs in micro:
        loss = fused.training_step(model, dict(inputs), torch.tensor(num_items))
        expected = plain.training_step(reference, dict(inputs), torch.tensor(num_items))
        assert_close(loss, expected, torch.float32)
    assert fused_calls == [EPS, EPS]
    assert_grads_close(model, reference)
    _, outputs = fused.compute_loss(model, dict(micro[0]), return_outputs=True)
    assert outputs.logits is None
    model.eval()  # evaluation: the Trainer's own label smoother on the logits
    loss, outputs = fused.compute_loss(model, dict(micro[0]), return_outputs=True)
    expected = plain.compute_loss(reference.eval(), dict(micro[0]))
    assert outputs.logits is not None and len(fused_calls) == 3
    assert_close(loss, expected, torch.float32)


def test_train_matches_transformers_trainer(tmp_path, fused_calls):
    """``trainer.train()``: 2 optimizer steps of 2 accumulated micro-batches (float64 models, so that
    AdamW's first steps, about lr x sign(gradient), see the same signs)."""
    model = tiny_model("gpt2", torch.float64)
    reference = copy.deepcopy(model)
    ft.apply(model)
    runs = [_trainer(ft.Trainer, model, tmp_path / "fused", max_steps=2),
            _trainer(transformers.Trainer, reference, tmp_path / "plain", max_steps=2)]  # fmt: skip
    losses = []
    for trainer in runs:
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(fused_calls) == 4
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert_close(p, r, torch.float32, msg=f"{name}: {(p - r).abs().max().item():.3g}")
