"""``linear_cross_entropy``'s arguments: torch's signature and layouts turned into heads of rows.

torch 2.13's ``F.linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight,
reduction, ignore_index, label_smoothing, options)`` is ``F.cross_entropy(F.linear(input, W, b)
.reshape(*batch, C, *out_features), target, ...)``. :func:`parse` checks those arguments (metadata
only) and lays the call out as what the chunk loops compute: ``(N, d)`` rows of hidden states and
one or more *heads* ``(W_k (C, d), b_k (C,), target_k)``, one per position ``k`` of a
K-dimensional weight ``(C, d_1, ..., d_K, d)`` (the logits of position ``k`` are ``H @ W[:, k].T``:
each position is its own ``(C, d)`` head over the same rows), one head for a ``(C, d)`` weight.
Targets of the logits' shape are probabilities (torch's rule), others class ids.

Errors: every check raises fusedls's ValueError / TypeError as the classes of ``_loss.py`` that
are also torch's RuntimeError (:func:`~fusedls.ops._loss.torch_compatible`).

``options`` (torch's ``LinearCrossEntropyOptions``): :func:`read_options` says what each field
does here; fusedls's chunks and kernels replace torch's chunked path whatever it holds.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

from .._tensors import acc_dtype as accumulation_dtype
from ._checks import check_choice, check_floating, check_int, check_same_device, check_tensor, check_unit_interval
from ._loss import INDEX_DTYPES, REDUCTIONS, check_loss_options, torch_compatible

STRATEGIES = ("auto", "tokens", "vocab", "fused")
ACC_POLICIES = ("auto", "accurate", "balanced", "compact")
# torch's options class, where torch has it (2.13 on); None where it does not (options= must be None)
OPTIONS_CLASS = getattr(torch.nn, "LinearCrossEntropyOptions", None)
DEPRECATED = {"bias": "linear_bias", "class_weight": "weight"}  # fusedls's names before torch's signature


class Head(NamedTuple):
    """One ``(C, d)`` head of a call: the weight, the bias (or None) and the targets of its rows
    (``(N,)`` int32/int64 class ids or ``(N, C)`` probabilities, contiguous)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    target: torch.Tensor


class Parsed(NamedTuple):
    """A checked call: the rows, the heads, and what the loss layer needs."""

    rows: torch.Tensor  # (N, d) hidden states, contiguous
    heads: list  # of Head: one, or one per position of a K-dimensional weight
    row_shape: tuple  # shape of the per-row loss (reduction="none"): (*batch, *out_features)
    prob: bool  # probability targets
    ignore_index: int
    eps: float  # label smoothing
    class_weight: Optional[torch.Tensor]  # (C,) in the accumulation dtype, contiguous
    out_dtype: torch.dtype  # the returned loss's dtype
    chunk_size: Optional[int]  # tokens per chunk (None: fusedls's default)
    sum_in_place: bool  # the weight gradient summed over chunks in its own storage and dtype
    retain: bool  # allow_retain_graph: backward keeps the forward's gradients
    z_loss: float
    softcap: Optional[float]
    features: frozenset  # the options in use, for the backend registry


def legacy_keywords(legacy: dict, linear_bias, weight):
    """``(linear_bias, weight)`` with fusedls's earlier keyword names ``bias=`` / ``class_weight=``
    read (a DeprecationWarning each); a TypeError for any other unknown keyword or for both names."""
    for old, value in legacy.items():
        new = DEPRECATED.get(old)
        if new is None:
            raise TypeError(f"linear_cross_entropy() got an unexpected keyword argument {old!r}")
        warnings.warn(f"linear_cross_entropy: {old}= is deprecated, use torch's name {new}=", DeprecationWarning,
                      stacklevel=3)  # fmt: skip
        if (linear_bias if new == "linear_bias" else weight) is not None:
            raise TypeError(f"linear_cross_entropy() got both {old}= and {new}=")
        if new == "linear_bias":
            linear_bias = value
        else:
            weight = value
    return linear_bias, weight


def parse(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
          chunk_size, acc_dtype, loss_dtype, strategy, extras) -> Parsed:  # fmt: skip
    """The checked call (see the module docstring); ``extras`` are fusedls's ``(z_loss, softcap,
    return_z_loss, return_lse, return_accuracy)``. Errors as torch's classes too."""
    try:
        return _parse(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                      options, chunk_size, acc_dtype, loss_dtype, strategy, extras)  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise torch_compatible(exc) from None


def _parse(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
           chunk_size, acc_dtype, loss_dtype, strategy, extras) -> Parsed:  # fmt: skip
    for name, tensor in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        check_tensor(name, tensor)
    check_floating("input", input)
    check_choice("reduction", reduction, REDUCTIONS)
    eps = check_unit_interval("label_smoothing", label_smoothing)
    check_choice("strategy", strategy, STRATEGIES)
    z_loss, softcap, features = check_loss_options(*extras)
    check_same_device("input", input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                      weight=weight)  # fmt: skip
    if input.dim() < 1:
        raise ValueError("input must have shape (d,), (N, d) or (..., d), got a scalar")
    d = input.shape[-1]
    if linear_weight.dim() < 2 or linear_weight.shape[-1] != d:
        raise ValueError(f"linear_weight must have shape (C, d) or (C, d_1, ..., d_K, d) with d = input.shape[-1] = "
                         f"{d}, got {tuple(linear_weight.shape)}")  # fmt: skip
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have input's dtype {input.dtype}, got {linear_weight.dtype}")
    n_cols, out_features, batch = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), tuple(input.shape[:-1])
    if out_features and input.dim() != 2:
        raise ValueError(f"a K-dimensional linear_weight {tuple(linear_weight.shape)} needs input of shape (N, {d}), "
                         f"got {tuple(input.shape)}")  # fmt: skip
    if n_cols == 0:
        raise ValueError("linear_weight has 0 rows (classes): no class id can be valid")
    prob = _check_target(target, batch, n_cols, out_features, ignore_index)
    ignore_index = -100 if ignore_index is None else check_int("ignore_index", ignore_index)
    if linear_bias is not None:
        check_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (n_cols, *out_features):
            raise ValueError(f"linear_bias must have shape {(n_cols, *out_features)}, got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype {input.dtype}, got {linear_bias.dtype}")
    if weight is not None:
        check_tensor("weight", weight)
        check_floating("weight", weight)
        if tuple(weight.shape) != (n_cols,):
            raise ValueError(f"weight (class weights) must have shape ({n_cols},), one entry per class, got "
                             f"{tuple(weight.shape)}")  # fmt: skip
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise TypeError(f"loss_dtype must be None or a floating-point torch.dtype, got {loss_dtype!r}")
    if prob and extras[4]:
        raise ValueError("return_accuracy needs a target of class ids, got probabilities")
    if prob and strategy in ("vocab", "fused"):
        raise ValueError(f"strategy={strategy!r} takes class-id targets; probability targets run the token chunks "
                         "(strategy='tokens' or 'auto')")  # fmt: skip
    rows = input if input.dim() == 2 and input.is_contiguous() else input.reshape(-1, d).contiguous()
    chunk_size, sum_in_place, retain = read_options(options, rows.shape[0], d, n_cols, chunk_size, acc_dtype,
                                                    linear_weight.dtype)  # fmt: skip
    out_dtype = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    return Parsed(
        rows, _heads(rows, linear_weight, linear_bias, target, prob, out_features), (*batch, *out_features), prob,
        ignore_index, eps, weight.to(accumulation_dtype(input)).contiguous() if weight is not None else None,
        loss_dtype or out_dtype, chunk_size, sum_in_place, retain, z_loss, softcap, features,
    )  # fmt: skip


def _check_target(target, batch, n_cols, out_features, ignore_index) -> bool:
    """Whether ``target`` holds probabilities (the logits' shape, torch's rule) or class ids."""
    logits_shape = (*batch, n_cols, *out_features) if out_features else (*batch, n_cols)
    class_shape = (*batch, *out_features)
    if tuple(target.shape) == logits_shape:
        if not target.is_floating_point():
            raise TypeError(f"a target of the logits' shape {logits_shape} holds class probabilities and must be "
                            f"floating-point, got {target.dtype}")  # fmt: skip
        if ignore_index is not None:
            raise ValueError("ignore_index cannot be specified when target contains probabilities")
        return True
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must hold class ids (an integer dtype) of shape {class_shape} or probabilities of "
                        f"shape {logits_shape}, got {target.dtype} of shape {tuple(target.shape)}")  # fmt: skip
    if tuple(target.shape) != class_shape:
        raise ValueError(f"target of class ids must have shape {class_shape} (input's batch, then the weight's "
                         f"d_1, ..., d_K), got {tuple(target.shape)}")  # fmt: skip
    return False


def _heads(rows, weight, bias, target, prob, out_features) -> list:
    """The heads of the call: the weight and bias themselves for a ``(C, d)`` weight (a view would
    cost autograd a weight-sized buffer to pass the gradient back through it), views of them
    per position of a K-dimensional one."""
    n_rows, n_cols, d = rows.shape[0], weight.shape[0], rows.shape[1]
    positions = math.prod(out_features)
    if prob:
        target = target.reshape(n_rows, n_cols, positions) if out_features else target.reshape(n_rows, n_cols)
    else:
        target = target.reshape(n_rows, positions) if out_features else target.reshape(n_rows)
        if target.dtype not in (torch.int64, torch.int32):
            target = target.to(torch.int64)
    if not out_features:
        return [Head(weight, bias, target if target.is_contiguous() else target.contiguous())]
    weight = weight.reshape(n_cols, positions, d)
    bias = bias.reshape(n_cols, positions) if bias is not None else None
    return [
        Head(weight[:, k], bias[:, k] if bias is not None else None,
             (target[:, :, k] if prob else target[:, k]).contiguous())
        for k in range(positions)
    ]  # fmt: skip


def read_options(options, n_rows, d, n_cols, chunk_size, acc_dtype, dtype) -> tuple[Optional[int], bool, bool]:
    """``(chunk_size, sum_in_place, retain)`` from torch's ``LinearCrossEntropyOptions`` (or None)
    and the keywords of the same meaning:

    * ``batch_chunk_size`` / ``chunking_method``: tokens per chunk. An explicit
      ``"aspect_ratio[:k]"`` gives torch's size, ``next_pow2(ceil(N / ceil(C / d))) // k``;
      ``chunking_method=None`` takes ``batch_chunk_size`` (None: one chunk of every token);
      ``"auto"`` with no ``batch_chunk_size`` keeps fusedls's byte-sized chunks. A ``chunk_size``
      keyword that disagrees is a ValueError.
    * ``acc_dtype`` (and the keyword of that name): how the weight gradient is summed over the
      token chunks. None, or the accumulation dtype (fp32; fp64 for fp64): exact sums, rounded
      once. The weight's own half-precision dtype: summed in place in the gradient's storage,
      one rounding per chunk, no fp32 ``(C, d)`` buffer.
    * ``acc_policy``: ``"compact"`` (torch: no weight-gradient scratch) sums in place as above;
      ``"auto"``, ``"accurate"``, ``"balanced"``: as ``acc_dtype`` says (the kernels compute in
      fp32 whatever the policy).
    * ``allow_retain_graph``: backward leaves the gradients computed in forward intact (one
      gradient-sized copy), so ``backward(retain_graph=True)`` may be called again.
    """
    retain, policy = False, "auto"
    if options is not None:
        if OPTIONS_CLASS is None or not isinstance(options, OPTIONS_CLASS):
            raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}"
                            + ("" if OPTIONS_CLASS is not None else " (this torch has no LinearCrossEntropyOptions)"))
        chunk_size = _options_chunk(options, n_rows, d, n_cols, chunk_size)
        acc_dtype = _same("acc_dtype", acc_dtype, options.acc_dtype)
        retain, policy = bool(options.allow_retain_graph), options.acc_policy
        check_choice("options.acc_policy", policy, ACC_POLICIES)
    exact = accumulation_dtype(dtype)
    if acc_dtype is not None and acc_dtype not in (exact, dtype):
        raise ValueError(f"acc_dtype must be None, {exact} (exact sums) or the weight's dtype {dtype} (summed in "
                         f"place), got {acc_dtype}")  # fmt: skip
    sum_in_place = exact != dtype and (acc_dtype == dtype or policy == "compact")
    return chunk_size, sum_in_place, retain


def _options_chunk(options, n_rows, d, n_cols, chunk_size) -> Optional[int]:
    method, size = options.chunking_method, options.batch_chunk_size
    if method == "auto" and size is not None:
        method = None  # torch: an explicit batch_chunk_size turns the automatic method off
    if method not in (None, "auto"):
        factor = int(method.partition(":")[2] or 1)
        target = -(-n_rows // -(-n_cols // d))
        rule = max(1, min((1 << max(0, target - 1).bit_length()) // factor, n_rows))
        if size is not None and size != rule:
            raise ValueError(f"options.batch_chunk_size={size} and options.chunking_method={method!r} give different "
                             f"chunk sizes ({size} vs {rule}); pass only one")  # fmt: skip
        size = rule
    elif method is None and size is None:
        size = max(1, n_rows)  # torch: no method and no size is one chunk
    return _same("chunk_size", chunk_size, size)


def _same(name: str, keyword, option):
    if keyword is not None and option is not None and keyword != option:
        raise ValueError(f"{name}={keyword} and options give {option}; pass one or make them agree")
    return keyword if keyword is not None else option
