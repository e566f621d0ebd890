"""The Trainer hook: ``TrainingArguments(label_smoothing_factor=eps)`` through the fused loss.

transformers' ``Trainer.compute_loss`` pops ``labels`` from the inputs whenever it has a
``label_smoother`` (``label_smoothing_factor > 0``) and smooths ``outputs.logits`` itself: a model
that never sees the labels cannot fuse its loss, and a fused forward has no logits to smooth.
:class:`FusedLossTrainerMixin` overrides ``compute_loss``: for a training step of a model patched by
:func:`fusedls.transformers.apply`, it leaves the labels in the inputs and has the patched model
compute the smoothed loss (torch's uniform convention, which is ``LabelSmoother``'s: same shifted
targets, same ``-100``, same denominator, ``num_items_in_batch`` included), then lets the Trainer's
own ``compute_loss`` do the rest (``num_items_in_batch``, ``average_tokens_across_devices``).
Evaluation steps, unpatched models and a user ``compute_loss_func`` take the Trainer's own path.
"""

from __future__ import annotations

import transformers

from .patch import patch_of


def _unwrapped(trainer, model):
    model = trainer.accelerator.unwrap_model(model)
    base = getattr(model, "get_base_model", None)  # PEFT
    return base() if callable(base) else model


class FusedLossTrainerMixin:
    """Mix into ``transformers.Trainer`` or a subclass of it (``class T(FusedLossTrainerMixin,
    trl.SFTTrainer)``) so that ``label_smoothing_factor`` reaches the patched model's fused loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        smoother = self.label_smoother
        patch = patch_of(_unwrapped(self, model))
        if (smoother is None or patch is None or self.compute_loss_func is not None or not model.training
                or "labels" not in inputs):  # fmt: skip
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.label_smoother = None  # the Trainer then passes the labels to the model
        try:
            with patch.using(label_smoothing=smoother.epsilon):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.label_smoother = smoother


class Trainer(FusedLossTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose ``label_smoothing_factor`` is computed by the fused loss of a
    model patched with :func:`fusedls.transformers.apply`."""
