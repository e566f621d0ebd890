"""fusedls.transformers: train a Hugging Face causal LM with fusedls's fused losses in one line.

    import fusedls.transformers
    fusedls.transformers.apply(model, label_smoothing=0.1)   # model: any XForCausalLM, patched in place

A training forward with ``labels`` then computes transformers' causal-LM loss (label shift,
``ignore_index``, ``num_items_in_batch``) with ``fusedls.linear_cross_entropy`` straight from the
last hidden states and the output embedding, never the ``(tokens, vocab)`` logits; everything else
is the model's own forward. :func:`apply` / :func:`remove` (:mod:`.patch`), the loss conventions
(:mod:`.loss`), and :class:`Trainer` / :class:`FusedLossTrainerMixin` (:mod:`.trainer`), which
carries ``TrainingArguments(label_smoothing_factor=...)`` to the fused loss. Needs the
``transformers`` package (``pip install "fusedls[transformers]"``); ``import fusedls`` does not
import this package. See docs/transformers.md.
"""

try:
    import transformers as _transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fusedls.transformers needs the transformers package: pip install 'fusedls[transformers]'"
    ) from exc

from .loss import LossOptions, hidden_loss, logits_loss
from .patch import Patch, apply, patch_of, remove
from .trainer import FusedLossTrainerMixin, Trainer

__all__ = [
    "FusedLossTrainerMixin",
    "LossOptions",
    "Patch",
    "Trainer",
    "apply",
    "hidden_loss",
    "logits_loss",
    "patch_of",
    "remove",
]
