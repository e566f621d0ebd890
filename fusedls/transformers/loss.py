"""transformers' causal-LM loss conventions on fusedls's losses.

transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``) is the contract:

* the target of position ``i`` is ``labels[..., i + 1]``: the labels are padded on the right with
  ``ignore_index`` and shifted by one, unless the caller gives ``shift_labels`` (already aligned
  with the positions, e.g. by a padding-free collator), which are used as they are;
* positions whose target is ``ignore_index`` (-100 unless the caller passes another) count for
  nothing;
* ``reduction="mean"`` over the positions not ignored, or, when ``num_items_in_batch`` is given (the
  Trainer's gradient accumulation and ``average_tokens_across_devices``), the ``"sum"`` divided by
  it: the token count of the whole accumulated batch;
* the loss is fp32 (transformers upcasts the logits first; here fp64 models keep fp64).

Label smoothing is torch's uniform convention (``(1 - eps)`` on the target and ``eps / V`` on every
class), which is also the Trainer's ``LabelSmoother`` on the same shifted targets and the same
denominator. :func:`hidden_loss` computes it from the last hidden states and the output embedding
(never the logits); :func:`logits_loss` from logits the model did materialise (evaluation, or when
the logits are asked for); both share :func:`shifted_targets` and :func:`normalise`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ops._checks import check_float_at_least, check_unit_interval
from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100  # transformers' default, which a caller may override per call


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of the patched loss (checked on construction)."""

    label_smoothing: float = 0.0  # torch's uniform convention, in [0, 1]
    z_loss: float = 0.0  # PaLM's z * logsumexp^2 per position not ignored, >= 0

    def __post_init__(self):
        object.__setattr__(self, "label_smoothing", check_unit_interval("label_smoothing", self.label_smoothing))
        object.__setattr__(self, "z_loss", check_float_at_least("z_loss", self.z_loss, 0.0))


def shifted_targets(labels, shift_labels, ignore_index: int) -> torch.Tensor:
    """The target of every position, flattened: ``shift_labels`` when given, else ``labels`` shifted
    left by one with ``ignore_index`` for the last position of each sequence."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels or shift_labels is required to compute the loss")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def reduction_for(num_items_in_batch) -> str:
    """``"sum"`` (to be divided by the accumulated batch's token count) or ``"mean"``."""
    return "mean" if num_items_in_batch is None else "sum"


def normalise(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """The loss in fp32 (fp64 for a fp64 model), the ``"sum"`` divided by ``num_items_in_batch`` when
    it is given."""
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
              **options) -> torch.Tensor:  # fmt: skip
    """``fusedls.linear_cross_entropy`` of ``hidden (N, d)`` through the head ``weight (V, d)`` and
    ``bias (V,)`` (or None): the one place where the head is handed to the fused op. The loss comes
    back in fp32 (fp64 for fp64), as transformers computes it, with no rounding to a half-precision
    model's dtype in between (``loss_dtype``)."""
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    return linear_cross_entropy(hidden, weight, target, linear_bias=bias, loss_dtype=loss_dtype, **options)


def hidden_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels, *,
                options: LossOptions, softcap: float | None = None, shift_labels=None, num_items_in_batch=None,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:  # fmt: skip
    """The causal-LM loss of the positions of ``hidden (..., d)`` (what the output embedding reads)
    through the head, without the logits; ``softcap``: the model caps its logits first
    (``config.final_logit_softcapping``)."""
    target = shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
    loss = head_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, ignore_index=ignore_index,
        reduction=reduction_for(num_items_in_batch), label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, softcap=softcap,
    )  # fmt: skip
    return normalise(loss, num_items_in_batch)


def logits_loss(logits: torch.Tensor, labels, vocab_size: int, *, options: LossOptions, shift_labels=None,
                num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:  # fmt: skip
    """The same loss from logits the model materialised (already capped by the model), upcast to
    fp32 as transformers does (fp64 logits stay fp64)."""
    target = shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = cross_entropy(
        logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
        reduction=reduction_for(num_items_in_batch), label_smoothing=options.label_smoothing, z_loss=options.z_loss,
    )  # fmt: skip
    return normalise(loss, num_items_in_batch)
