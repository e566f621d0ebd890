"""Modules: drop-in replacements for their ``torch.nn`` namesakes."""

from __future__ import annotations

import torch

from .ops._checks import check_unit_interval
from .ops.cross_entropy import cross_entropy
from .ops.dropout import dropout
from .ops.dropout_norm import dropout_add_layer_norm, dropout_add_rms_norm
from .ops.foreach_norm import regularization_penalty
from .ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["CrossEntropyLoss", "Dropout", "DropoutAddLayerNorm", "DropoutAddRMSNorm", "LinearCrossEntropyLoss", "RegularizationPenalty"]


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


class LinearCrossEntropyLoss(torch.nn.Module):
    """Loss of an LM head without its logits: ``forward(hidden, weight, target, bias=None)`` is
    :func:`fusedls.linear_cross_entropy` with this module's options (``ignore_index``,
    ``reduction``, ``label_smoothing``, ``class_weight`` (a buffer, as torch's ``weight``),
    ``z_loss``, ``softcap``, ``return_z_loss``, ``return_lse``, ``chunk_size``, ``strategy``). The head's
    ``weight`` / ``bias`` stay the model's parameters and are passed in."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_z_loss: bool = False,
        return_lse: bool = False,
        chunk_size: int | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.options = dict(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, return_z_loss=return_z_loss, return_lse=return_lse, chunk_size=chunk_size,
            strategy=strategy,
        )  # fmt: skip

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias=None):
        return linear_cross_entropy(hidden, weight, target, bias, class_weight=self.class_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class RegularizationPenalty(torch.nn.Module):
    """``l1 * sum |w| + l2 * sum w^2`` over the weights of the module it is called on:
    ``penalty = RegularizationPenalty(l2=1e-4)``, then ``loss = task_loss + penalty(model)``.
    Computed by :func:`fusedls.regularization_penalty` (default rule: parameters with ndim >= 2,
    so biases and norm weights are not penalised; ``include(name, param) -> bool`` to choose)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0, *, include=None) -> None:
        super().__init__()
        self.l1, self.l2, self.include = l1, l2, include

    def forward(self, module: torch.nn.Module) -> torch.Tensor:
        return regularization_penalty(module, self.l1, self.l2, include=self.include)

    def extra_repr(self) -> str:
        return f"l1={self.l1}, l2={self.l2}" + (f", include={self.include!r}" if self.include else "")


class Dropout(torch.nn.Dropout):
    """:class:`torch.nn.Dropout` computed by :func:`fusedls.dropout` (no mask stored)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class _DropoutAddNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, p: float, eps: float, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.p = check_unit_interval("p", p)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, p={self.p}, eps={self.eps}"


class DropoutAddRMSNorm(_DropoutAddNorm):
    """``forward(x, residual=None) -> (y, h)``: :func:`dropout_add_rms_norm` with a learned weight."""

    def __init__(self, hidden_size: int, p: float = 0.1, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__(hidden_size, p, eps, False, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dropout_add_rms_norm(x, residual, self.weight, self.p, self.eps, self.training)


class DropoutAddLayerNorm(_DropoutAddNorm):
    """``forward(x, residual=None) -> (y, h)``: :func:`dropout_add_layer_norm` with weight and bias."""

    def __init__(
        self, hidden_size: int, p: float = 0.1, eps: float = 1e-5, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(hidden_size, p, eps, bias, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, self.eps, self.training)
