"""What the loss ops share (``cross_entropy``, ``linear_cross_entropy``, the vocabulary-parallel
losses): the option checks, the target check, torch's mean denominator, the reduction and the
return convention."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ._checks import check_float_at_least

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # class-id targets


class CrossEntropyResult(NamedTuple):
    """What the losses return when ``return_z_loss`` or ``return_lse`` is set; the fields not
    asked for are None."""

    loss: torch.Tensor  # the loss, z-loss included (differentiable)
    z_loss: Optional[torch.Tensor]  # the z-loss part of ``loss``, reduced like it (no gradient)
    lse: Optional[torch.Tensor]  # per-row log-sum-exp of the (capped) logits, 0 on ignored rows


def check_loss_options(z_loss, softcap, return_z_loss, return_lse) -> tuple[float, Optional[float], frozenset]:
    """Validates the options fusedls adds to cross-entropy; returns ``(z_loss, softcap,
    features)``, ``features`` naming those in use for :func:`fusedls.backend.registry.resolve`."""
    z_loss = check_float_at_least("z_loss", z_loss, 0.0)
    if softcap is not None:
        softcap = check_float_at_least("softcap", softcap, 0.0, strict=True)
    for name, flag in (("return_z_loss", return_z_loss), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    used = {"z_loss": z_loss != 0.0, "softcap": softcap is not None, "return_lse": return_lse}
    return z_loss, softcap, frozenset(name for name, on in used.items() if on)


def check_target_values(target: torch.Tensor, n_cols: int, ignore_index: int, backend: str) -> None:
    """Raises ValueError for a class id outside ``[0, n_cols)`` that is not ``ignore_index``.

    Free on CPU tensors, and done there for the eager and cpp backends (torch raises IndexError
    there). On GPU (and for the triton kernels under the CPU interpreter, which stand for the
    GPU) the kernels turn such rows into NaN instead of synchronising; ``FUSEDLS_CHECK_TARGETS=1``
    asks for this (synchronising) check everywhere, for debugging.
    """
    if target.is_floating_point() or target.numel() == 0:
        return
    on_cpu = backend in ("eager", "cpp") and target.device.type == "cpu"
    if not (on_cpu or os.environ.get("FUSEDLS_CHECK_TARGETS") == "1"):
        return
    bad = ((target < 0) | (target >= n_cols)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target contains class id {value}, outside [0, {n_cols}) and not ignore_index={ignore_index}"
        )


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


def result(loss, z, lse, return_z_loss: bool, return_lse: bool):
    """The loss alone, or the :class:`CrossEntropyResult` the flags ask for."""
    if not (return_z_loss or return_lse):
        return loss
    return CrossEntropyResult(loss, z if return_z_loss else None, lse if return_lse else None)
