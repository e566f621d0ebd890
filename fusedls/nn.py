"""Modules: drop-in replacements for their ``torch.nn`` namesakes."""

from __future__ import annotations

import math

import torch

from .ops._checks import check_unit_interval
from .ops._loss import LossValueError
from .ops.cross_entropy import cross_entropy
from .ops.dropout import dropout
from .ops.dropout_norm import dropout_add_layer_norm, dropout_add_rms_norm
from .ops.foreach_norm import regularization_penalty
from .ops.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "CrossEntropyLoss", "Dropout", "DropoutAddLayerNorm", "DropoutAddRMSNorm", "HeadCrossEntropyLoss",
    "LinearCrossEntropyLoss", "RegularizationPenalty",
]  # fmt: skip


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


# torch's module where torch has it (2.13 on); else the same module rebuilt (_TorchLinearCrossEntropyLoss)
_TORCH_LINEAR_CROSS_ENTROPY_LOSS = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class _TorchLinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """torch 2.13's ``nn.LinearCrossEntropyLoss`` for the torch versions without it: the same
    constructor, attributes, parameters (``self.linear``, its weight flat as ``(C * prod(out_features),
    in_features)``) and errors; its forward is :class:`LinearCrossEntropyLoss`'s."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0, options=None) -> None:  # fmt: skip
        if weight is not None and weight.shape != (num_classes,):
            raise LossValueError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise LossValueError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.ignore_index, self.label_smoothing, self.options = ignore_index, label_smoothing, options
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, options={self.options}")


class LinearCrossEntropyLoss(_TORCH_LINEAR_CROSS_ENTROPY_LOSS or _TorchLinearCrossEntropyLoss):
    """:class:`torch.nn.LinearCrossEntropyLoss` (a subclass of it where torch has it) computed by
    :func:`fusedls.linear_cross_entropy`, never holding the logits.

    The same constructor (``in_features``, ``num_classes``, keyword-only ``out_features``,
    ``bias``, ``device``, ``dtype``, ``reduction``, ``weight``, ``ignore_index``,
    ``label_smoothing``, ``options``), parameters (``self.linear``), state dict and
    ``forward(input, target)``; fusedls's options after them, keyword-only: ``z_loss``,
    ``softcap``, ``return_z_loss``, ``return_lse``, ``return_accuracy``, ``chunk_size``,
    ``strategy``, ``acc_dtype``, ``loss_dtype``, ``filter_eps`` (see :func:`fusedls.linear_cross_entropy`). For a
    head that belongs to the model (an LM head, a tied embedding): :class:`HeadCrossEntropyLoss`.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0, options=None, **extras) -> None:  # fmt: skip
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                         reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)  # fmt: skip
        self.extras = _extras(extras)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        linear_weight = self.linear.weight.reshape(self.num_classes, *self.out_features, self.linear.in_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=bias.reshape(self.num_classes, *self.out_features) if bias is not None
            else None, weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, **self.extras,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join([super().extra_repr(), *(f"{k}={v!r}" for k, v in self.extras.items())])


class HeadCrossEntropyLoss(torch.nn.Module):
    """Loss of a head passed to forward, without its logits: ``forward(input, linear_weight,
    target, linear_bias=None)`` is :func:`fusedls.linear_cross_entropy` with this module's options
    (every keyword of the function: ``weight`` (class weights, a buffer as torch's), ``reduction``,
    ``ignore_index``, ``label_smoothing``, ``options``, ``z_loss``, ``softcap``, ``return_z_loss``,
    ``return_lse``, ``return_accuracy``, ``chunk_size``, ``strategy``, ``acc_dtype``, ``filter_eps``,
    ``loss_dtype``). The head's weight and bias stay the model's parameters (an LM head, a tied
    embedding), unlike :class:`LinearCrossEntropyLoss`, which owns its ``Linear``."""

    def __init__(self, *, weight: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None, **extras) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            options=options, **_extras(extras))  # fmt: skip

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None):  # fmt: skip
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    **self.options)  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_EXTRAS = ("z_loss", "softcap", "return_z_loss", "return_lse", "return_accuracy", "chunk_size", "strategy", "acc_dtype",
           "loss_dtype", "filter_eps")  # fusedls's keyword-only options of linear_cross_entropy, taken by both modules


def _extras(extras: dict) -> dict:
    unknown = sorted(set(extras) - set(_EXTRAS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; fusedls's options are {list(_EXTRAS)}")
    return extras


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
