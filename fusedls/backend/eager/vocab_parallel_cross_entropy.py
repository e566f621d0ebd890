"""Local math of the vocabulary-parallel cross-entropy (``fusedls/ops/vocab_parallel_cross_entropy.py``).

What one rank computes on its slice ``[start, start + C_local)`` of the ``C`` classes, a chunk
of rows at a time, with no communication: the per-row statistics that the collectives combine,
and the gradient of the local logits once the global log-sum-exp is known. Everything is in
the accumulation dtype (fp32, fp64 for fp64 logits) and rounded once by the caller.

Notation for one row: logits ``x`` (after the optional soft cap ``z = s * tanh(x / s)``),
target ``y``, class weights ``w`` (all 1 without weights), ``W = sum_c w_c``, ``keep = 1 - eps``,
``spread = eps / C`` with the GLOBAL ``C``, z-loss factor ``lam``. Row loss::

    l = keep * w_y * (lse - z_y) + spread * (W * lse - sum_c w_c z_c) + lam * lse**2

Gradient (``d lse / d z_c = p_c = exp(z_c - lse)``)::

    dl/dz_c = coef * p_c - keep * w_y * [c = y] - spread * w_c,
    coef    = keep * w_y + spread * W + 2 * lam * lse,
    dl/dx_c = dl/dz_c * (1 - (z_c / s)**2)          (soft cap: d tanh(u) / du = 1 - tanh(u)**2)

Every row term but ``p_c`` and the local ``w_c`` is a per-row scalar, so once ``lse`` and
``coef`` are known each rank forms its slice of the gradient alone.

Probability targets (this rank's slice ``t`` of each row's distribution, ``t' = keep * t +
spread``): ``l = sum_c w_c t'_c (lse - z_c) + lam * lse**2``, ``dl/dz_c = coef * p_c - w_c t'_c``
with ``coef = sum_c w_c t'_c + 2 * lam * lse`` (summed over every rank), and
``dl/dt_c = keep * w_c * (lse - z_c)``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .cross_entropy import sech2
from ..protocols import N_STATS, SUM_EXP, TARGET_LOGIT, TARGET_WEIGHT, WEIGHT_TOTAL, WEIGHTED_SUM

# Rows per chunk are chosen so a chunk of local logits holds about this many elements (fp32
# temporaries of 16 MiB); tests lower it to run the chunk loop many times.
_CHUNK_ELEMENTS = 1 << 22

UNSUPPORTED: frozenset[str] = frozenset()


def row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Slices of rows whose ``n_cols`` local logits hold about ``_CHUNK_ELEMENTS`` elements."""
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def capped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``s * tanh(x / s)`` (Gemma 2's logit soft cap), or ``x`` when ``softcap`` is None."""
    return x if softcap is None else torch.tanh(x / softcap).mul_(softcap)


def _weighted_target(probs: torch.Tensor, weight, keep: float, spread: float, acc) -> torch.Tensor:
    """``w_c * t'_c`` with the smoothed target ``t' = keep * t + spread`` (probability targets)."""
    t = probs.to(acc).mul(keep).add_(spread)
    return t if weight is None else t.mul_(weight)


def init_statistics(n_rows, n_cols, y_local, owned, probs, weight, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_local`` (all ``-inf``) and ``stats`` (zeros) with the columns that need no logits
    filled: the target's weight and the weight total (arguments as :func:`local_statistics`)."""
    device = (y_local if probs is None else probs).device
    lse_local = torch.full((n_rows,), float("-inf"), dtype=acc, device=device)
    stats = torch.zeros((n_rows, N_STATS), dtype=acc, device=device)
    if weight is not None:
        if n_cols and probs is None:
            stats[:, TARGET_WEIGHT] = torch.where(owned, weight[y_local], 0.0)
        stats[:, WEIGHT_TOTAL] = weight.sum()
    return lse_local, stats


def local_statistics(
    logits_of: Callable[[slice], torch.Tensor],
    n_rows: int,
    n_cols: int,
    y_local: torch.Tensor | None,
    owned: torch.Tensor | None,
    probs: torch.Tensor | None,
    weight: torch.Tensor | None,
    keep: float,
    spread: float,
    softcap: float | None,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row statistics of this rank's classes.

    Args:
        logits_of: returns the local logits ``(r, n_cols)`` of a slice of rows (any float dtype;
            a view of the logits, or a matmul chunk of the linear variant).
        n_rows: number of rows ``R``.
        n_cols: number of local classes ``C_local`` (may be 0).
        y_local: class ids: ``(R,)`` int64 local column of each row's target, valid where
            ``owned`` (0 elsewhere); None for probability targets.
        owned: class ids: ``(R,)`` bool, the target is one of this rank's classes (and not
            ignored); None for probability targets.
        probs: probability targets: ``(R, C_local)``, this rank's slice of the target
            distribution; None for class ids.
        weight: ``(C_local,)`` local slice of the class weights (acc dtype) or None.
        keep: ``1 - eps``.
        spread: ``eps / C`` (global C); class ids: also whether to compute ``sum_c w_c z_c``.
        softcap: the soft cap ``s``, or None.
        acc: accumulation dtype.

    Returns:
        ``lse_local`` ``(R,)``: the log-sum-exp of the local (capped) logits, ``-inf`` for
        ``C_local = 0``; ``stats`` ``(R, N_STATS)``: the local parts of what is summed across
        ranks, with ``SUM_EXP`` left 0 for the caller (it needs the global max first). For
        probability targets ``TARGET_WEIGHT`` holds ``sum_c w_c t'_c`` and ``TARGET_LOGIT``
        ``sum_c w_c t'_c z_c``, the row loss being ``TARGET_WEIGHT * lse - TARGET_LOGIT``.
    """
    lse_local, stats = init_statistics(n_rows, n_cols, y_local, owned, probs, weight, acc)
    if n_cols == 0:
        return lse_local, stats
    for rows in row_chunks(n_rows, n_cols):
        z = capped(logits_of(rows).to(acc), softcap)
        lse_local[rows] = torch.logsumexp(z, dim=1)
        if probs is not None:
            # 0 * -inf gives NaN, exactly as torch's -(t * logp).sum()
            tw = _weighted_target(probs[rows], weight, keep, spread, acc)
            stats[rows, TARGET_WEIGHT] = tw.sum(1)
            stats[rows, TARGET_LOGIT] = (tw * z).sum(1)
            continue
        z_y = z.gather(1, y_local[rows, None]).squeeze(1)
        stats[rows, TARGET_LOGIT] = torch.where(owned[rows], z_y, 0.0)
        if spread != 0.0:
            stats[rows, WEIGHTED_SUM] = z.sum(1) if weight is None else z @ weight
    return lse_local, stats


def local_grad(
    x: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    target: torch.Tensor,
    target_coef: torch.Tensor | None,
    weight: torch.Tensor | None,
    keep: float,
    spread: float,
    softcap: float | None,
    scale: torch.Tensor,
    acc: torch.dtype,
    target_grad: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scale * dl/dx`` of a chunk of local logits, in ``acc`` (see the module docstring), and
    for probability targets that want it ``scale * dl/dt``.

    Args:
        x: ``(r, C_local)`` local logits (before the soft cap), any float dtype.
        lse: ``(r,)`` global log-sum-exp of each row.
        coef: ``(r,)`` factor of ``p_c``: ``keep * w_y + spread * W + 2 * lam * lse`` (class
            ids) or ``sum_c w_c t'_c + 2 * lam * lse`` (probabilities).
        target: ``(r,)`` local column of the target (any valid column where not owned), or
            ``(r, C_local)`` this rank's slice of the target distribution.
        target_coef: class ids: ``(r,)`` ``keep * w_y`` where this rank owns the target, else 0.
        weight: ``(C_local,)`` local class weights or None.
        keep: ``1 - eps``.
        spread: ``eps / C`` (global C).
        softcap: the soft cap ``s``, or None.
        scale: ``(r,)`` upstream factor of each row (0 for ignored rows, NaN for bad targets).
        acc: accumulation dtype.
        target_grad: probability targets: also return ``dl/dt_c = keep * w_c * (lse - z_c)``.
        out: ``(r, C_local)`` tensor (contiguous rows) to write the gradient into, rounded to
            its dtype, and return; None returns it in ``acc``.
    """
    z = capped(x.to(acc), softcap)
    g = torch.exp(z - lse[:, None]).mul_(coef[:, None])
    grad_target = None
    if target.is_floating_point():
        # dl/dz_c = (sum_k w_k t'_k) p_c - w_c t'_c
        g -= _weighted_target(target, weight, keep, spread, acc)
        if target_grad:
            grad_target = (lse[:, None] - z).mul_((keep * scale)[:, None])
            if weight is not None:
                grad_target.mul_(weight)
    else:
        if spread != 0.0:
            g -= spread if weight is None else spread * weight
        g.scatter_add_(1, target[:, None], -target_coef[:, None])
    if softcap is not None:  # dz/dx = 1 - tanh(x / s)^2, without cancellation
        g.mul_(sech2(x.to(acc) / softcap))
    g.mul_(scale[:, None])
    return (g if out is None else out.copy_(g)), grad_target
