"""``cpp`` backend of ``cross_entropy``: the C++ kernels of ``csrc/cpu/cross_entropy.cpp``.

Same interface and contract as ``fusedls/eager/cross_entropy.py`` (read it; the math is in
``fusedls/kernels/cross_entropy.py``): fp32 statistics for fp32 / bf16 / fp16 logits, one
sweep of each row for the statistics and one for the gradient, rows spread over torch's
intra-op threads (``torch.set_num_threads``). Out-of-range class ids never reach the kernels
on CPU (fusedls/ops/cross_entropy.py raises first); the kernels would give NaN rows.
"""

from __future__ import annotations

import torch

from . import ops

UNSUPPORTED = frozenset({"z_loss", "softcap", "return_lse"})

# Tuning: classes per block of a row sweep (rounded down to whole vector steps); 0 is the
# kernels' default (4096: 16 KB of fp32 per block, which stays in L1 between a block's two
# passes). Tests lower it so small vocabularies span several blocks.
BLOCK_C = 0


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    ignore_index: int,
    keep: float,
    spread: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`fusedls.eager.cross_entropy.cross_entropy_forward`."""
    loss, lse, coef = ops().cross_entropy_forward(
        logits, target, weight, grad, grad_scale, ignore_index, keep, spread, BLOCK_C
    )
    return loss, lse, coef


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
    grad_target: torch.Tensor | None,
    ignore_index: int,
    keep: float,
    spread: float,
) -> None:
    """See :func:`fusedls.eager.cross_entropy.cross_entropy_backward`."""
    ops().cross_entropy_backward(
        grad_loss, logits, target, weight, lse, coef, grad, grad_target, ignore_index, keep, spread, BLOCK_C
    )


def cross_entropy_scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` row by row; rows whose factor is exactly 1 are left alone."""
    if factor.dim() == 0 and float(factor) == 1.0:
        return  # loss.backward(): nothing to do (a CPU scalar costs nothing to read)
    ops().cross_entropy_scale_grad_(grad, factor)
