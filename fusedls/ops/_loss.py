"""What the loss ops share (``cross_entropy``, ``linear_cross_entropy``, the vocabulary-parallel
losses): the option checks, the target check, torch's mean denominator, the reduction and the
return convention."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..backend import registry
from ..backend.protocols import bad_target_error
from ._checks import check_float_at_least

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # class-id targets


class CrossEntropyResult(NamedTuple):
    """What the losses return when ``return_z_loss``, ``return_lse`` or ``return_accuracy`` is
    set; the fields not asked for are None."""

    loss: torch.Tensor  # the loss, z-loss included (differentiable)
    z_loss: Optional[torch.Tensor]  # the z-loss part of ``loss``, reduced like it (no gradient)
    lse: Optional[torch.Tensor]  # per-row log-sum-exp of the (capped) logits, 0 on ignored rows
    accuracy: Optional[torch.Tensor] = None  # argmax == target over the rows not ignored (see token_accuracy)


def check_loss_options(z_loss, softcap, return_z_loss, return_lse, return_accuracy=False):
    """Validates the options fusedls adds to cross-entropy; returns ``(z_loss, softcap,
    features)``, ``features`` naming those in use for :func:`fusedls.backend.registry.resolve`."""
    z_loss = check_float_at_least("z_loss", z_loss, 0.0)
    if softcap is not None:
        softcap = check_float_at_least("softcap", softcap, 0.0, strict=True)
    flags = (("return_z_loss", return_z_loss), ("return_lse", return_lse), ("return_accuracy", return_accuracy))
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    used = {"z_loss": z_loss != 0.0, "softcap": softcap is not None, "return_lse": return_lse,
            "return_accuracy": return_accuracy}  # fmt: skip
    return z_loss, softcap, frozenset(name for name, on in used.items() if on)


def token_accuracy(argmax: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, dtype) -> torch.Tensor:
    """Token accuracy from each row's argmax (class-id targets), ignored rows excluded: per row
    (``"none"``) 1 where the argmax is the target, else 0 (0 on ignored rows); summed
    (``"sum"``: the number of rows right); or that count over the rows not ignored (``"mean"``;
    NaN when every row is ignored, as the loss). Unweighted by class weights; ``dtype`` (the
    accumulation dtype). Device ops only: no host synchronisation."""
    valid = target != ignore_index
    right = (argmax == target) & valid
    if reduction == "none":
        return right.to(dtype)
    total = right.sum(dtype=dtype)
    return total if reduction == "sum" else total / valid.sum(dtype=dtype)


def check_target_values(target: torch.Tensor, n_cols: int, ignore_index: int, always: bool = False) -> None:
    """Raises ValueError for a class id outside ``[0, n_cols)`` that is not ``ignore_index``.

    Done when ``always`` (a caller whose backends do not check: CPU tensors only, where it costs no
    synchronisation) or when ``FUSEDLS_CHECK_TARGETS=1`` asks for it everywhere (for debugging:
    one host synchronisation per call). The CPU backends check their targets themselves (the
    eager backend from the mask it computes anyway, the cpp backend in C++); GPU kernels, and
    the triton kernels under the CPU interpreter that stand for them, give NaN rows instead.
    """
    if not (always or registry.check_targets()) or target.is_floating_point() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= n_cols)) & (target != ignore_index)
    if bool(bad.any()):
        raise bad_target_error(int(target[bad][0]), n_cols, ignore_index)


def mean_denominator(target, weight, ignore_index: int, n_cols: int, acc: torch.dtype) -> torch.Tensor:
    """torch's denominator of a class-id mean: the summed weights of the rows not ignored."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=acc)
    return (weight[target.clamp(0, n_cols - 1).long()] * valid).sum()


def reduce_rows(rows: torch.Tensor, reduction: str, denom) -> torch.Tensor:
    """Per-row values reduced as the loss is: as they are, summed, or summed / ``denom``."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if denom is None else total / denom


def finish_forward(ctx, loss, lse, reduction: str, denom, z_loss: float, want_z: bool):
    """The ``(loss, z, lse)`` outputs of a loss Function's forward: the reduced loss, the z-loss
    term reduced alike (empty unless ``want_z``) and the per-row lse, the last two without grad."""
    ctx.set_materialize_grads(False)
    # Ignored rows have lse = 0, so z lse^2 counts the rows that are not ignored only.
    z = reduce_rows(z_loss * lse * lse, reduction, denom) if want_z else lse.new_empty(0)
    ctx.mark_non_differentiable(z, lse)
    return reduce_rows(loss, reduction, denom), z, lse


def result(loss, z, lse, return_z_loss: bool, return_lse: bool, accuracy=None):
    """The loss alone, or the :class:`CrossEntropyResult` the flags (and an ``accuracy`` given)
    ask for."""
    if not (return_z_loss or return_lse or accuracy is not None):
        return loss
    return CrossEntropyResult(loss, z if return_z_loss else None, lse if return_lse else None, accuracy)
