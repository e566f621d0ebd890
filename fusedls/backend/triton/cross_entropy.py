"""The triton backend's ``cross_entropy``: launchers of the kernels in cross_entropy_kernels.py
(the chunked and register-resident paths, the math in its docstring) and cross_entropy_split.py
(the split-row path). The tuning table (tuning.py) picks the path per row length and dtype.
"""

from __future__ import annotations

import torch
import triton

from .cross_entropy_kernels import cross_entropy_bwd_kernel, cross_entropy_fwd_kernel, cross_entropy_scale_grad_kernel
from .cross_entropy_split import N_PARTIALS, cross_entropy_split_kernel
from . import tuning
from .launch import launch, resident_programs
from .tuning import (
    cross_entropy_config, cross_entropy_programs, cross_entropy_resident_config, cross_entropy_split_config,
    cross_entropy_split_programs,
)  # fmt: skip

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op


# ----------------------------------------------------------------------------------------------
# Launchers: the triton backend's implementation of the interface in fusedls/backend/eager/cross_entropy.py
# ----------------------------------------------------------------------------------------------


def _flags(target: torch.Tensor, weight: torch.Tensor | None, keep: float) -> dict:
    prob = target.is_floating_point()
    return dict(
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=keep != 1.0,
        PROB_TARGET=prob,
    )


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    ignore_index: int,
    keep: float,
    spread: float,
    z_loss: float = 0.0,
    softcap: float | None = None,
    argmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses, lse and gradient coefficients; writes the gradient into ``grad`` if given,
    each row's argmax into ``argmax`` if given.

    See :func:`fusedls.backend.eager.cross_entropy.cross_entropy_forward` for the contract.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    coef = torch.empty_like(loss)
    if n_rows == 0:
        return loss, lse, coef
    write_grad = grad is not None
    rows = (
        logits, logits.stride(0),
        target, target.stride(0),
        weight if weight is not None else loss,
        loss, lse, coef,
        grad if write_grad else logits, grad.stride(0) if write_grad else 0,
        grad_scale if write_grad else loss,
        argmax if argmax is not None else loss,
    )  # fmt: skip
    scalars = (ignore_index, keep, spread, z_loss, softcap or 1.0)
    flags = dict(WRITE_GRAD=write_grad, HAS_Z_LOSS=z_loss != 0.0, HAS_SOFTCAP=softcap is not None,
                 ARGMAX=argmax is not None, **_flags(target, weight, keep))  # fmt: skip
    extras = weight is not None or target.is_floating_point() or softcap is not None
    resident = cross_entropy_resident_config(n_cols, logits.element_size(), extras)
    split = None if resident else cross_entropy_split_config(logits.device, n_rows, n_cols, logits.element_size())
    if split is not None:
        _forward_split(*split, rows, scalars, flags, n_rows, n_cols)
        return loss, lse, coef
    cfg = resident or cross_entropy_config(n_cols, logits.element_size())
    # Rows in flight that must stay in L2 for the second sweep (none on the resident path).
    row_bytes = 0 if resident else n_cols * logits.element_size()
    programs = cross_entropy_programs(logits.device, row_bytes, n_rows) if write_grad else n_rows
    launch(cross_entropy_fwd_kernel, (programs,), *rows, n_rows, n_cols, *scalars,
           RESIDENT=resident is not None, BLOCK_C=cfg.block_c, **cfg.launch_options(), **flags)  # fmt: skip
    return loss, lse, coef


def _forward_split(cfg, n_splits: int, rows: tuple, scalars: tuple, flags: dict, n_rows: int, n_cols: int) -> None:
    """The split-row forward (cross_entropy_split.py): cooperative where every program of a
    round can be resident at once on a GPU, else (the interpreter, or a device too small for one
    row's slices) the two-phase variant, which reads each slice twice."""
    logits = rows[0]
    partials = torch.empty(n_rows, n_splits, N_PARTIALS, device=logits.device, dtype=torch.float32)
    partial_args = torch.empty(n_rows, n_splits, device=logits.device, dtype=torch.int32)
    counts = torch.zeros(n_rows, device=logits.device, dtype=torch.int32)
    n_items = n_rows * n_splits
    options = dict(MAX_SPLITS=triton.next_power_of_2(n_splits), BLOCK_C=cfg.block_c, **cfg.launch_options(), **flags)
    args = (*rows, partials, partial_args, counts, n_rows, n_cols, n_splits, *scalars)
    cooperative = (tuning.CROSS_ENTROPY_SPLIT_COOPERATIVE and logits.is_cuda
                   and isinstance(cross_entropy_split_kernel, triton.runtime.JITFunction))  # fmt: skip
    programs = None
    if cooperative:
        resident = resident_programs(cross_entropy_split_kernel, *args, PHASE=0, **options)
        programs = cross_entropy_split_programs(resident, n_splits, n_items)
    if programs is not None:
        launch(cross_entropy_split_kernel, (programs,), *args, PHASE=0, **options)
        return
    programs = cross_entropy_programs(logits.device, 0, n_items)
    for phase in (1, 2):
        launch(cross_entropy_split_kernel, (programs,), *args, PHASE=phase, **options)


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
    softcap: float | None = None,
) -> None:
    """Writes dL/dlogits into ``grad`` (and dL/dtarget into ``grad_target`` if given); ``grad``
    may be ``logits`` itself (each element is read before it is overwritten)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    cfg = cross_entropy_config(n_cols, logits.element_size())
    target_grad = grad_target is not None
    launch(cross_entropy_bwd_kernel, (n_rows,),
        grad_loss, grad_loss.stride(0) if grad_loss.dim() == 1 else 0,
        logits, logits.stride(0),
        target, target.stride(0),
        weight if weight is not None else lse,
        lse, coef,
        grad, grad.stride(0),
        grad_target if target_grad else grad, grad_target.stride(0) if target_grad else 0,
        n_cols, ignore_index, keep, spread, softcap or 1.0,
        TARGET_GRAD=target_grad, HAS_SOFTCAP=softcap is not None, BLOCK_C=cfg.block_c, **cfg.launch_options(),
        **_flags(target, weight, keep),
    )  # fmt: skip


def cross_entropy_scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` row by row (factor 0-dim or (R,)), skipped on the device where 1."""
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return
    cfg = cross_entropy_config(n_cols, grad.element_size())
    launch(cross_entropy_scale_grad_kernel, (n_rows,),
        grad, grad.stride(0),
        factor, factor.stride(0) if factor.dim() == 1 else 0,
        n_cols,
        BLOCK_C=cfg.block_c, **cfg.launch_options(),
    )  # fmt: skip

