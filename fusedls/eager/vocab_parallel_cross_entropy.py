"""Local math of the vocabulary-parallel cross-entropy (``fusedls/distributed.py``).

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
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

# Rows per chunk are chosen so a chunk of local logits holds about this many elements (fp32
# temporaries of 16 MiB); tests lower it to run the chunk loop many times.
_CHUNK_ELEMENTS = 1 << 22

# Columns of the per-row statistics summed across ranks (one all-reduce).
SUM_EXP, TARGET_LOGIT, TARGET_WEIGHT, WEIGHTED_SUM, WEIGHT_TOTAL = range(5)
N_STATS = 5


def row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Slices of rows whose ``n_cols`` local logits hold about ``_CHUNK_ELEMENTS`` elements."""
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def capped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``s * tanh(x / s)`` (Gemma 2's logit soft cap), or ``x`` when ``softcap`` is None."""
    return x if softcap is None else torch.tanh(x / softcap).mul_(softcap)


def local_statistics(
    logits_of: Callable[[slice], torch.Tensor],
    n_rows: int,
    n_cols: int,
    y_local: torch.Tensor,
    owned: torch.Tensor,
    weight: torch.Tensor | None,
    smoothing: bool,
    softcap: float | None,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row statistics of this rank's classes.

    Args:
        logits_of: returns the local logits ``(r, n_cols)`` of a slice of rows (any float dtype;
            a view of the logits, or a matmul chunk of the linear variant).
        n_rows: number of rows ``R``.
        n_cols: number of local classes ``C_local`` (may be 0).
        y_local: ``(R,)`` int64 local column of each row's target, valid where ``owned``
            (0 elsewhere).
        owned: ``(R,)`` bool, the target is one of this rank's classes (and not ignored).
        weight: ``(C_local,)`` local slice of the class weights (acc dtype) or None.
        smoothing: compute ``sum_c w_c z_c`` (only label smoothing needs it).
        softcap: the soft cap ``s``, or None.
        acc: accumulation dtype.

    Returns:
        ``lse_local`` ``(R,)``: the log-sum-exp of the local (capped) logits, ``-inf`` for
        ``C_local = 0``; ``stats`` ``(R, N_STATS)``: the local parts of what is summed across
        ranks, with ``SUM_EXP`` left 0 for the caller (it needs the global max first).
    """
    device = y_local.device
    lse_local = torch.full((n_rows,), float("-inf"), dtype=acc, device=device)
    stats = torch.zeros((n_rows, N_STATS), dtype=acc, device=device)
    if weight is not None:
        if n_cols:
            stats[:, TARGET_WEIGHT] = torch.where(owned, weight[y_local], 0.0)
        stats[:, WEIGHT_TOTAL] = weight.sum()
    if n_cols == 0:
        return lse_local, stats
    for rows in row_chunks(n_rows, n_cols):
        z = capped(logits_of(rows).to(acc), softcap)
        lse_local[rows] = torch.logsumexp(z, dim=1)
        z_y = z.gather(1, y_local[rows, None]).squeeze(1)
        stats[rows, TARGET_LOGIT] = torch.where(owned[rows], z_y, 0.0)
        if smoothing:
            stats[rows, WEIGHTED_SUM] = z.sum(1) if weight is None else z @ weight
    return lse_local, stats


def local_grad(
    x: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    y_local: torch.Tensor,
    target_coef: torch.Tensor,
    weight: torch.Tensor | None,
    spread: float,
    softcap: float | None,
    scale: torch.Tensor,
    acc: torch.dtype,
) -> torch.Tensor:
    """``scale * dl/dx`` of a chunk of local logits, in ``acc`` (see the module docstring).

    Args:
        x: ``(r, C_local)`` local logits (before the soft cap), any float dtype.
        lse: ``(r,)`` global log-sum-exp of each row.
        coef: ``(r,)`` factor of ``p_c``: ``keep * w_y + spread * W + 2 * lam * lse``.
        y_local: ``(r,)`` local column of the target (any valid column where not owned).
        target_coef: ``(r,)`` ``keep * w_y`` where this rank owns the target, else 0.
        weight: ``(C_local,)`` local class weights or None.
        spread: ``eps / C`` (global C).
        softcap: the soft cap ``s``, or None.
        scale: ``(r,)`` upstream factor of each row (0 for ignored rows, NaN for bad targets).
        acc: accumulation dtype.
    """
    z = capped(x.to(acc), softcap)
    g = torch.exp(z - lse[:, None]).mul_(coef[:, None])
    if spread != 0.0:
        g -= spread if weight is None else spread * weight
    g.scatter_add_(1, y_local[:, None], -target_coef[:, None])
    if softcap is not None:
        g.mul_(1.0 - (z / softcap).square_())
    return g.mul_(scale[:, None])
