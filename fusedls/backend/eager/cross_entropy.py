"""Eager (pure PyTorch) backend of ``cross_entropy``: the kernels' math, row block by row block.

A ``CrossEntropyBackend`` (``fusedls/backend/protocols.py``, which states the contract) with the
formulas of ``fusedls/backend/triton/cross_entropy.py`` (read its module docstring for the
derivation): fp32 statistics (fp64 for fp64 logits, which only this backend takes), the gradient
formed in that precision and rounded once; an out-of-range class id raises ValueError on CPU
tensors and gives NaN rows elsewhere. Rows are processed in blocks so the fp32 temporaries stay
about ``_BLOCK_ELEMENTS`` elements (``_DEVICE_BLOCK_ELEMENTS`` off the CPU), whatever the size of
the logits.
"""

from __future__ import annotations

import torch

from ..._tensors import acc_dtype
from ..protocols import bad_target_error

UNSUPPORTED: frozenset[str] = frozenset()  # every feature of the op

# Elements per row block. CPU: 1M (the fp32 temporaries stay in cache). Elsewhere (a GPU without
# Triton): every op of a block is a launch costing ~10-40 us of host time, ~25 ops a block, so few
# large blocks: 64M elements, 256 MB per fp32 temporary (the H100 figure behind it is in
# benchmarks/results/nvidia-h100-80gb-hbm3/README.md).
_BLOCK_ELEMENTS = 1 << 20
_DEVICE_BLOCK_ELEMENTS = 1 << 26


def _row_blocks(n_rows: int, n_cols: int, device: torch.device):
    block = _BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    step = max(1, block // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))



def _class_terms(target, weight, n_cols, ignore_index, keep, acc):
    """Per-row y (clamped), ignored mask, out-of-range mask and keep * w_y, for class ids."""
    y = target.long()
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= n_cols)) & ~ignored
    y = y.masked_fill(ignored | bad, 0)
    if weight is None:
        target_term = torch.full(y.shape, keep, dtype=acc, device=y.device)
    else:
        target_term = keep * weight[y]
    return y, ignored, bad, target_term


def _capped(x, softcap):
    """(capped logits, the cap's derivative or None): ``s * tanh(x / s)``, never in place, and
    ``1 - tanh(x / s)^2`` (:func:`sech2`)."""
    if softcap is None:
        return x, None
    u = x / softcap
    return softcap * torch.tanh(u), sech2(u)


def sech2(u: torch.Tensor) -> torch.Tensor:
    """``1 - tanh(u)^2`` as ``4 e / (1 + e)^2`` with ``e = exp(-2 |u|)``: no cancellation where
    tanh nears +-1 (from a rounded tanh it is 0 beyond |u| ~ 9 and loses digits well before)."""
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e).square()


def _grad_block(x, lse, coef, y, target_term, t, weight, keep, spread, scale, dcap=None):
    """dl/dx (fp32) of a block of rows; ``scale`` is the per-row factor (R_blk, 1); ``x`` are
    the capped logits and ``dcap`` the cap's derivative (the chain rule) when capping."""
    g = coef[:, None] * torch.exp(x - lse[:, None])
    if t is not None:  # probability targets
        tt = keep * t.to(x.dtype) + spread
        g -= tt if weight is None else tt * weight
    else:
        if spread != 0.0:
            g -= spread if weight is None else spread * weight
        g.scatter_add_(1, y[:, None], -target_term[:, None])
    if dcap is not None:
        g.mul_(dcap)
    return g.mul_(scale)


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
    """Returns ``(loss, lse, coef)`` per row (fp32, fp64 for fp64 logits); writes ``grad_scale * dl/dlogits`` into
    ``grad`` when it is given (``grad`` may be ``logits`` itself: each block is read before it
    is overwritten). Ignored rows: loss, lse, coef and gradient 0. ``lse`` is that of the capped
    logits; ``loss`` and ``coef`` include the z-loss ``z * lse^2`` and its ``2 z lse``.
    ``argmax``: each row's ``torch.argmax`` of the capped logits (first of tied maxima), -1 on
    ignored rows."""
    n_rows, n_cols = logits.shape
    dev = logits.device
    acc = acc_dtype(logits)
    loss = torch.empty(n_rows, dtype=acc, device=dev)
    lse = torch.empty_like(loss)
    coef = torch.empty_like(loss)
    prob = target.is_floating_point()
    for rows in _row_blocks(n_rows, n_cols, logits.device):
        x, dcap = _capped(logits[rows].to(acc), softcap)
        blk_lse = torch.logsumexp(x, dim=1)
        if prob:
            tt = keep * target[rows].to(acc) + spread
            if weight is not None:
                tt = tt * weight
            blk_coef = tt.sum(1)
            # sum_c t'_c (lse - x_c); 0 * -inf gives NaN exactly as torch's -(t * logp).sum().
            blk_loss = blk_coef * blk_lse - (tt * x).sum(1)
            bad = ignored = None
            y = target_term = None
        else:
            y, ignored, bad, target_term = _class_terms(target[rows], weight, n_cols, ignore_index, keep, acc)
            if bad.device.type == "cpu" and bool(bad.any()):  # free on CPU; GPU rows become NaN
                raise bad_target_error(int(target[rows][bad][0]), n_cols, ignore_index)
            x_y = x.gather(1, y[:, None]).squeeze(1)
            blk_loss = target_term * (blk_lse - x_y)
            blk_coef = target_term.clone()
            if spread != 0.0:
                w_sum = float(n_cols) if weight is None else weight.sum()
                wx = x.sum(1) if weight is None else x @ weight
                blk_loss = blk_loss + spread * (w_sum * blk_lse - wx)
                blk_coef = blk_coef + spread * w_sum
        if z_loss != 0.0:  # z * lse^2, d/dx_c = 2 z lse p_c
            blk_loss = blk_loss + z_loss * blk_lse * blk_lse
            blk_coef = blk_coef + 2.0 * z_loss * blk_lse
        if not prob:
            blk_loss = blk_loss.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
            blk_lse = blk_lse.masked_fill(ignored, 0.0)
            blk_coef = blk_coef.masked_fill(ignored, 0.0)
        loss[rows], lse[rows], coef[rows] = blk_loss, blk_lse, blk_coef
        if argmax is not None:
            arg = x.argmax(1)
            argmax[rows] = arg if prob else arg.masked_fill_(ignored, -1)
        if grad is not None:
            scale = grad_scale.to(acc).expand(x.shape[0]).clone()
            if not prob:
                scale = scale.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
            t = target[rows] if prob else None
            # Ignored rows keep lse = 0 for the caller; +inf here makes their exp() terms 0, not
            # 0 * inf = NaN for logits beyond ~88 (the kernels write those rows as zeros).
            g_lse = blk_lse if prob else blk_lse.masked_fill(ignored, float("inf"))
            g = _grad_block(x, g_lse, blk_coef, y, target_term, t, weight, keep, spread, scale[:, None], dcap)
            grad[rows] = g
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
    softcap: float | None = None,
) -> None:
    """Writes dL/dlogits into ``grad`` (and dL/dtarget into ``grad_target`` when given);
    ``grad_loss`` is the factor of each row: 0-dim (broadcast) or (R,). ``grad`` may be
    ``logits`` itself. A z-loss needs no argument here: forward put it into ``coef``."""
    n_rows, n_cols = logits.shape
    acc = acc_dtype(logits)
    prob = target.is_floating_point()
    factor = grad_loss.to(acc).expand(n_rows)
    for rows in _row_blocks(n_rows, n_cols, logits.device):
        x, dcap = _capped(logits[rows].to(acc), softcap)
        scale = factor[rows].clone()
        y = target_term = t = None
        g_lse = lse[rows]
        if prob:
            t = target[rows]
        else:
            y, ignored, bad, target_term = _class_terms(target[rows], weight, n_cols, ignore_index, keep, acc)
            scale = scale.masked_fill(bad, float("nan")).masked_fill(ignored, 0.0)
            g_lse = g_lse.masked_fill(ignored, float("inf"))  # as in forward: zero, not NaN, rows
        g = _grad_block(x, g_lse, coef[rows], y, target_term, t, weight, keep, spread, scale[:, None], dcap)
        if grad_target is not None:  # before grad is written: grad may alias the logits x views
            dt = lse[rows, None] - x
            if weight is not None:
                dt = dt * weight
            grad_target[rows] = dt.mul_(keep * scale[:, None])
        grad[rows] = g


def cross_entropy_scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad *= factor`` row by row; ``factor`` is 0-dim or (R,)."""
    if factor.device.type == "cpu" and factor.dim() == 0 and float(factor) == 1.0:
        return  # loss.backward(): nothing to do (reading a CPU scalar costs no GPU sync)
    if factor.dim() == 1:
        grad.mul_(factor[:, None])
    else:
        grad.mul_(factor)
