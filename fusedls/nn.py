"""Modules: drop-in replacements for their ``torch.nn`` namesakes."""

from __future__ import annotations

import torch

from .ops.cross_entropy import cross_entropy
from .ops.dropout import Dropout, DropoutAddLayerNorm, DropoutAddRMSNorm

__all__ = ["CrossEntropyLoss", "Dropout", "DropoutAddLayerNorm", "DropoutAddRMSNorm"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by :func:`fusedls.cross_entropy`.

    Takes torch's arguments (``weight``, ``size_average``, ``ignore_index``, ``reduce``,
    ``reduction``, ``label_smoothing``) plus the keyword-only ``smoothing_convention`` and
    ``inplace_backward`` of :func:`fusedls.cross_entropy`. It is a subclass of torch's module, so
    ``isinstance`` checks and state dicts carry over.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        smoothing_convention: str = "uniform",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.smoothing_convention = smoothing_convention
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing_convention=self.smoothing_convention,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, smoothing_convention={self.smoothing_convention!r}, "
            f"inplace_backward={self.inplace_backward}"
        )
