"""The interface of each op's backends: one :class:`typing.Protocol` per op.

Every backend module of an op (``fusedls/backend/<backend>/<op>.py``) satisfies that op's
Protocol structurally (a module is an implementation: its functions are the methods, its
constants the attributes); ``tests/test_backend.py`` checks each module's signatures against
it. The op layer (``fusedls/ops``) calls only what is declared here.

Shared conventions: tensors arrive contiguous in the layouts named; statistics and sums are in
the accumulation dtype (fp32, or fp64 for fp64 inputs, which only the eager backend receives);
results are rounded once to their output dtype. ``UNSUPPORTED`` names the optional features of
the op a backend does not implement (``registry.resolve`` passes over it for calls that use one).
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

class TargetError(ValueError, IndexError):
    """A class id outside ``[0, C)`` that is not ``ignore_index``: a ValueError (fusedls's
    convention) and an IndexError (what torch raises for it)."""


def bad_target_error(value: int, n_cols: int, ignore_index: int) -> TargetError:
    """The error a backend raises for a class id outside ``[0, n_cols)`` that is not
    ``ignore_index``, where checking costs no synchronisation (CPU tensors)."""
    return TargetError(f"target contains class id {value}, outside [0, {n_cols}) and not ignore_index={ignore_index}")


def dropout_threshold(p: float) -> int:
    """The drop threshold ``t`` of probability ``p``, shared by every backend: an element is kept
    iff its 16-bit draw ``u`` (uniform in ``[0, 2^16)``) is ``>= t``, so ``P(drop) = t / 2^16``:
    ``p`` with 16 bits of resolution (``p < 2^-17`` drops nothing, ``p >= 1 - 2^-17`` all)."""
    return min(1 << 16, int(p * 65536.0 + 0.5))


# Columns of the vocabulary-parallel per-row statistics, summed across ranks in one all-reduce.
SUM_EXP, TARGET_LOGIT, TARGET_WEIGHT, WEIGHTED_SUM, WEIGHT_TOTAL = range(5)
N_STATS = 5


@runtime_checkable
class CrossEntropyBackend(Protocol):
    """Per-row cross-entropy of ``(R, C)`` logits with contiguous classes.

    ``target``: ``(R,)`` class ids (int32 / int64) or ``(R, C)`` probabilities; ``weight``: fp32
    ``(C,)`` class weights or None; ``keep = 1 - eps`` and ``spread = eps / C`` (the smoothing
    convention already applied); ``z_loss``: z of ``z * lse^2`` (0: none); ``softcap``: s of the
    cap ``s * tanh(x / s)`` (None: none). The math is derived in
    ``fusedls/backend/triton/cross_entropy.py``. Ignored rows: loss, lse, coef and gradient 0. A
    class id outside ``[0, C)`` that is not ``ignore_index``: on CPU tensors the forward raises
    :func:`bad_target_error` (free there); elsewhere that row's loss and gradient are NaN, with no
    host synchronisation and never a read outside the row.
    """

    UNSUPPORTED: frozenset[str]  # of {"z_loss", "softcap", "return_lse", "return_accuracy"}

    def cross_entropy_forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor | None,
        grad_scale: torch.Tensor | None, ignore_index: int, keep: float, spread: float, z_loss: float = 0.0,
        softcap: float | None = None, argmax: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(loss, lse, coef)`` per row; writes ``grad_scale * dloss/dlogits`` into ``grad`` when
        given (``grad`` may be ``logits`` itself: each element is read before it is overwritten;
        ``grad_scale`` a 0-dim fp32 tensor). ``lse`` is that of the capped logits; ``loss`` and
        ``coef`` (the factor of ``p_c`` in the gradient) include the z-loss. ``argmax`` (int64
        ``(R,)``, class-id targets; feature ``"return_accuracy"``), when given, receives each row's
        argmax of the (capped) logits found in the same sweep, the first of tied maxima (as
        ``torch.argmax``), -1 on ignored rows."""
        ...

    def cross_entropy_backward(
        self, grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
        lse: torch.Tensor, coef: torch.Tensor, grad: torch.Tensor, grad_target: torch.Tensor | None,
        ignore_index: int, keep: float, spread: float, softcap: float | None = None,
    ) -> None:  # fmt: skip
        """Writes ``dL/dlogits`` into ``grad`` (and ``dL/dtarget`` into ``grad_target`` when
        given) for the per-row factors ``grad_loss`` (0-dim: broadcast, or ``(R,)``); ``lse`` and
        ``coef`` from forward (a z-loss is already in ``coef``). ``grad`` may be ``logits``."""
        ...

    def cross_entropy_scale_grad_(self, grad: torch.Tensor, factor: torch.Tensor) -> None:
        """``grad *= factor`` row by row (``factor`` 0-dim or ``(R,)``, fp32); rows whose factor
        is exactly 1 are left alone, decided on the device without a host synchronisation."""
        ...


@runtime_checkable
class DropoutBackend(Protocol):
    """Dropout without a stored mask, alone, with a residual add, and with RMSNorm / LayerNorm.

    Tensors are rows: ``(R, N)``, or for ``dropout_forward`` a contiguous tensor of any shape whose
    rows are its last dimension (N = its last size; a 0-dim tensor is one row of one). The mask is a pure function of ``seed`` (an int64 device tensor),
    the row, the column and N, the same bits on every backend: element ``(r, c)`` takes the 16-bit
    half ``c % 2`` of word ``(c % 8) // 2`` of Philox-4x32-10 at counter ``r * ceil(N / 8) + c // 8``
    and is kept iff that draw is ``>= dropout_threshold(p)``; kept elements are scaled by
    ``1 / (1 - p)``. Forward and backward regenerate the same mask.
    """

    UNSUPPORTED: frozenset[str]

    def dropout_forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, seed: torch.Tensor,
        p: float, out: torch.Tensor,
    ) -> None:  # fmt: skip
        """Writes ``residual + (x + bias) * m`` into ``out`` (all contiguous with x's shape, any number
        of dimensions; bias ``(N,)`` broadcast over rows; ``out`` may be ``x``), computed in fp32,
        rounded once."""
        ...

    def dropout_add_norm_unsupported(self, n_cols: int, element_size: int) -> str:
        """Why rows of ``n_cols`` elements of ``element_size`` bytes cannot be normalised here
        ("" when they can): a backend's own limit, e.g. a kernel that keeps a row in registers."""
        ...

    def dropout_add_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
        seed: torch.Tensor | None, p: float, eps: float, is_rms: bool, y: torch.Tensor, h: torch.Tensor,
        mean: torch.Tensor, rstd: torch.Tensor,
    ) -> None:  # fmt: skip
        """``(R, N)`` rows: writes ``h = residual + dropout(x)`` (no dropout when ``seed`` is
        None), ``y = norm(h) * weight + bias`` (weight None: 1, bias None: 0), and the fp32 row
        statistics ``mean`` (LayerNorm only) and ``rstd``; the rounded ``h`` is normalised."""
        ...

    def dropout_add_norm_backward(
        self, dy: torch.Tensor, dh_next: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
        mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor | None, p: float, is_rms: bool, dx: torch.Tensor,
        dresidual: torch.Tensor | None, dweight: torch.Tensor | None, dbias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """Writes ``dx``, ``dresidual`` (when given) and the fp32 ``(N,)`` sums ``dweight`` and
        ``dbias`` (when given); ``dh_next`` is the upstream gradient of the returned ``h``."""
        ...


@runtime_checkable
class VectorNormBackend(Protocol):
    """Norms of the rows of an ``(R, N)`` matrix, ``torch.linalg.vector_norm`` semantics, with no
    intermediate overflow or underflow (sums scaled as derived in
    ``fusedls/backend/triton/vector_norm.py``)."""

    UNSUPPORTED: frozenset[str]

    def vector_norm_forward(
        self, rows: torch.Tensor, ord: float, out: torch.Tensor, norm: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Norm of each row (N >= 1) into ``out`` (output dtype) and ``norm`` (accumulation
        dtype; ``out`` itself when the two dtypes are one); for ord +-inf the number of elements
        tied at the norm into ``count`` when it is not empty."""
        ...

    def vector_norm_backward(
        self, grad: torch.Tensor, rows: torch.Tensor, norm: torch.Tensor, count: torch.Tensor, ord: float,
        dx: torch.Tensor,
    ) -> None:  # fmt: skip
        """Writes ``d(sum_i grad_i norm_i) / d rows`` into ``dx``; ``norm`` and ``count`` from
        forward; ord != 0."""
        ...


@runtime_checkable
class ForeachNormBackend(Protocol):
    """Norms, clipping and penalties of a list of dense tensors of one device (any dtypes mixed),
    with a fixed number of launches whatever the number of tensors. ``ord`` is any float
    (2, 1, inf, -inf, 0, other p); results in the accumulation dtype of the list."""

    UNSUPPORTED: frozenset[str]

    def foreach_norms(self, tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
        """``(n,)`` norm of each tensor."""
        ...

    def total_norm(
        self, tensors: list[torch.Tensor], ord: float, norm_of_norms: bool = False, max_norm: float | None = None,
        square: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Norm of all the tensors as one vector (``norm_of_norms``: the norm of the per-tensor
        norms, as torch's clipping; ``square``: squared), and the clipping coefficient
        ``min(max_norm / (total + 1e-6), 1)`` when ``max_norm`` is given."""
        ...

    def scale_(self, tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
        """``t *= coef`` in place for every tensor (``coef`` a 1-element fp32 tensor); nothing is
        read or written where it is exactly 1."""
        ...

    def penalty(self, tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
        """``sum |w|`` (``"l1"``) or ``sum w^2`` (``"l2"``) over every tensor, 0-dim."""
        ...

    def penalty_backward(self, tensors: list[torch.Tensor], grad: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """``grad * sign(w)`` (l1) or ``grad * 2w`` (l2), each in its tensor's dtype."""
        ...


@runtime_checkable
class VocabParallelCrossEntropyBackend(Protocol):
    """One rank's local math of the vocabulary-parallel cross-entropy: statistics of its slice of
    the classes (before the collectives) and the gradient of its logits (after them), a chunk of
    rows at a time, with no communication. Derivation: ``fusedls/backend/eager/vocab_parallel_cross_entropy.py``.
    """

    UNSUPPORTED: frozenset[str]  # of {"prob_target"}

    def row_chunks(self, n_rows: int, n_cols: int) -> Iterator[slice]:
        """Slices of rows whose local logits stay within the backend's working-memory budget."""
        ...

    def local_statistics(
        self, logits_of: Callable[[slice], torch.Tensor], n_rows: int, n_cols: int, y_local: torch.Tensor | None,
        owned: torch.Tensor | None, probs: torch.Tensor | None, weight: torch.Tensor | None, keep: float,
        spread: float, softcap: float | None, acc: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(lse_local (R,), stats (R, N_STATS))`` of this rank's classes; the columns of
        ``stats`` are :data:`SUM_EXP` ... :data:`WEIGHT_TOTAL`."""
        ...

    def local_grad(
        self, x: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, target: torch.Tensor,
        target_coef: torch.Tensor | None, weight: torch.Tensor | None, keep: float, spread: float,
        softcap: float | None, scale: torch.Tensor, acc: torch.dtype, target_grad: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """``scale * dl/dx`` of a chunk of local logits given the global ``lse`` and ``coef``
        (into ``out`` when given, else in ``acc``), and ``scale * dl/dt`` for probability
        targets when ``target_grad``."""
        ...


# The Protocol of each op, by the op's name in registry.OPS.
PROTOCOLS: dict[str, type] = {
    "cross_entropy": CrossEntropyBackend,
    "dropout": DropoutBackend,
    "vector_norm": VectorNormBackend,
    "foreach_norm": ForeachNormBackend,
    "vocab_parallel_cross_entropy": VocabParallelCrossEntropyBackend,
}
