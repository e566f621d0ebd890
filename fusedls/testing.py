"""What tests and benchmarks share: the per-dtype tolerance table and the float64 reference.

Tolerances are those of one rounding of a value computed in fp32 (or better) to the output
dtype, with a little room for the fp32 arithmetic before it: relative ``2**-7`` for bf16
(8 significant bits), ``2**-10`` for fp16 (11 bits); fp32 results come from fp32 sums over
up to a few thousand classes. The absolute part only covers values near zero (fp16 gradients
of small probabilities are subnormal: spacing 6e-8). Values whose error is not relative to
themselves (sums whose terms cancel, functions of rounded inputs) are compared relative to their
condition instead (``assert_close(..., condition=)``, :func:`rounding_condition`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=2**-10, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
}


# Unit roundoff of the storage dtypes whose rounding dominates the error.
_UNIT_ROUNDOFF = {torch.float16: 2**-11, torch.bfloat16: 2**-8}


def tolerance(dtype: torch.dtype, roundings: int = 1) -> dict[str, float]:
    """``rtol``/``atol`` for results of ``dtype`` compared with the float64 truth.

    ``roundings=2`` for a value rounded to ``dtype`` twice: a gradient written during forward
    and then rescaled by an upstream factor other than 1 (see fusedls/ops/cross_entropy.py).
    """
    tol = dict(TOLERANCES[dtype])
    tol["rtol"] += (roundings - 1) * _UNIT_ROUNDOFF.get(dtype, 0.0)
    return tol


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    msg: str = "",
    roundings: int = 1,
    condition: torch.Tensor | None = None,
) -> None:
    """``actual`` against ``expected`` (float64 truth) within the tolerance of ``dtype``
    (``actual.dtype`` by default); NaN and inf must match position by position.

    ``condition``: the scale of the relative part of the tolerance (``|expected|`` by default),
    for values whose error is not relative to themselves: a sum whose terms cancel (pass the sum
    of their magnitudes, e.g. ``|A| @ |B|`` for ``A @ B``) or a function of rounded inputs
    (:func:`rounding_condition`). Then ``|actual - expected| <= atol + rtol * condition``
    element by element.
    """
    tol = tolerance(dtype or actual.dtype, roundings)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if condition is None:
        torch.testing.assert_close(a, e, equal_nan=True, msg=msg or None, **tol)
        return
    if a.shape != e.shape:
        raise AssertionError(f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    bound = tol["atol"] + tol["rtol"] * condition.detach().double().cpu().expand_as(e)
    ratio = ((a - e).abs() / bound).nan_to_num(nan=float("inf"))
    same = (a == e) | (a.isnan() & e.isnan())  # equal infinities and NaNs pass
    ratio = torch.where(same, 0.0, ratio)
    if ratio.numel() and not bool((ratio <= 1).all()):
        i = int(ratio.flatten().argmax())
        raise AssertionError(
            f"{msg}: {int((ratio > 1).sum())} of {ratio.numel()} elements beyond atol + rtol * condition "
            f"(rtol {tol['rtol']:.3g}, atol {tol['atol']:.3g}); worst at flat index {i}: {a.flatten()[i].item()!r} "
            f"vs {e.flatten()[i].item()!r}, |difference| {ratio.flatten()[i].item():.3g} x the bound"
        )


def rounding_condition(
    output: torch.Tensor, inputs: torch.Tensor, magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """``|Y| + sum_j |dY/dx_j| m_j`` for Y = ``output``, a differentiable function of ``inputs``
    x (float64), and ``m = |x|`` unless ``magnitudes`` says otherwise: how far Y moves, in units of
    the relative error u, when Y is rounded and each input moves by u m_j (rounded: m = |x|; a sum
    accumulated in lower precision: the sum of its terms' magnitudes), to first order. A loss of
    logits rounded to bf16 errs by that much however small it is, and so does its gradient.

    Each element of Y is a function of its own row of x (the last dimension): Y has the shape of x
    without its last dimension (a loss per row), or that of x (a gradient: differentiated once
    more, so build it with ``create_graph=True``), or is 0-dim (a function of all of x).
    """
    m = inputs.detach().abs() if magnitudes is None else magnitudes.detach()
    if output.shape != inputs.shape:
        (grad,) = torch.autograd.grad(output.sum(), inputs, retain_graph=True, allow_unused=True)
        terms = torch.zeros_like(m) if grad is None else grad.abs() * m
        return output.detach().abs() + (terms.sum() if output.dim() == 0 else terms.sum(-1))
    # Row c of every row's Jacobian block at once: the gradient of output[..., c] (rows depend on
    # their own inputs only), batched over c.
    picks = torch.eye(inputs.shape[-1], dtype=output.dtype, device=output.device)
    picks = picks.view(-1, *[1] * (output.dim() - 1), inputs.shape[-1]).expand(-1, *output.shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # kernels this small, split across threads, mostly wait on each other
    try:
        (rows,) = torch.autograd.grad(
            output, inputs, picks, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    finally:
        torch.set_num_threads(threads)
    moved = torch.zeros_like(m) if rows is None else (rows.abs() * m).sum(-1).movedim(0, -1)
    return output.detach().abs() + moved


def reference_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    upstream: torch.Tensor | None = None,
    smoothing_convention: str = "uniform",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """torch's ``F.cross_entropy`` in float64 on the same (already rounded) values.

    Returns ``(loss, d loss/d input, d loss/d target)``: the gradients are those of
    ``(loss * upstream).sum()`` (``upstream`` defaults to ones), the target's only when it is
    a probability target that requires grad. ``smoothing_convention="others"`` is written out
    as an explicit target distribution (``1 - eps`` on the target, ``eps / (C - 1)``
    elsewhere), independently of the identity fusedls uses.
    """
    x = input.detach().double().requires_grad_(input.requires_grad)
    prob = target.is_floating_point()
    t = target.detach().double().requires_grad_(target.requires_grad) if prob else target
    w = weight.double() if weight is not None else None
    if smoothing_convention == "others":
        eps = kwargs.pop("label_smoothing", 0.0)
        ignore_index = kwargs.pop("ignore_index", -100)
        reduction = kwargs.pop("reduction", "mean")
        class_dim = 0 if x.dim() == 1 else 1
        n_cols = x.shape[class_dim]
        valid = t != ignore_index
        onehot = F.one_hot(t.masked_fill(~valid, 0).long(), n_cols).movedim(-1, class_dim).double()
        dist = onehot * (1 - eps) + (1 - onehot) * (eps / (n_cols - 1) if n_cols > 1 else 0.0)
        logp = torch.log_softmax(x, class_dim)
        wv = w.view([-1] + [1] * (x.dim() - class_dim - 1)) if w is not None else 1.0
        rows = -(dist * logp * wv).sum(class_dim) * valid
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            denom = valid.sum().double() if w is None else (w[t.masked_fill(~valid, 0).long()] * valid).sum()
            # torch: NaN loss when every row is ignored, yet zero (not NaN) gradients.
            loss = rows.sum() / denom.clamp_min(1e-300) + torch.where(denom == 0, float("nan"), 0.0)
    else:
        loss = F.cross_entropy(x, t, w, **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream.double().to(loss.device).expand_as(loss)
    grad_x = grad_t = None
    wants = [v for v in (x, t) if isinstance(v, torch.Tensor) and v.requires_grad]
    if wants:
        grads = torch.autograd.grad(loss, wants, up, allow_unused=True)
        grad_x = grads[0] if x.requires_grad else None
        grad_t = grads[-1] if prob and t.requires_grad else None
    return loss.detach(), grad_x, grad_t


def reference_cross_entropy_options(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch composition that defines fusedls's ``z_loss`` / ``softcap`` options.

    ``reduce(F.cross_entropy(s * tanh(x / s), t, w, reduction="none", ...) + z * lse^2 * valid)``
    with ``lse = logsumexp(s * tanh(x / s))``, ``valid`` the rows not ignored (every row for
    probability targets) and ``mean`` dividing by torch's denominator (summed ``w_y`` of the valid
    rows; the row count for probability targets). Computed in the dtype of ``input`` (pass float64)
    and differentiable through it; returns ``(loss, z-loss term reduced alike, per-row lse with 0 on
    ignored rows)``. Every row ignored: NaN mean, zero gradient, as torch.
    """
    class_dim = 0 if input.dim() == 1 else 1
    x = softcap * torch.tanh(input / softcap) if softcap is not None else input
    w = weight.to(x.dtype) if weight is not None else None
    rows = F.cross_entropy(x, target, w, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    if target.is_floating_point():
        valid = torch.ones_like(rows, dtype=torch.bool)
        denom = torch.tensor(float(rows.numel()), dtype=x.dtype, device=x.device)
    else:
        valid = target != ignore_index
        safe = target.masked_fill(~valid, 0)
        denom = valid.sum().to(x.dtype) if w is None else (w[safe] * valid).sum()
    lse = torch.logsumexp(x, class_dim) * valid
    z_rows = z_loss * lse * lse

    def reduce(values):
        if reduction == "none":
            return values
        if reduction == "sum":
            return values.sum()
        return values.sum() / denom.clamp_min(1e-300) + torch.where(denom == 0, float("nan"), 0.0)

    return reduce(rows + z_rows), reduce(z_rows), lse
