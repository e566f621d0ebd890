"""Gradient sums of ``linear_cross_entropy``'s token chunks (``strategy="tokens"``), also used
by the vocabulary-parallel linear path (fusedls/ops/vocab_parallel_cross_entropy.py).

Each token chunk adds its contribution to every gradient: ``grad_hidden[chunk] = g @ W`` is
complete within the chunk; ``grad_weight = sum over chunks of g.T @ h_c`` and ``grad_bias = sum
of g`` are sums over chunks, kept in fp32 (fp64 for fp64) and rounded once at the end
(:class:`_WeightGrad`), or for the weight, with ``acc_dtype`` the weight's half-precision dtype,
summed in place in the gradient's own storage (:class:`_InPlaceWeightGrad`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._tensors import acc_dtype


class _WeightGrad:
    """``grad_weight = sum over chunks of g.T @ h_c``, summed in fp32 (fp64 for fp64).

    Weight in the accumulation dtype: one buffer, ``addmm_`` into it. Otherwise (bf16/fp16) the
    sum lives in fp32 blocks of VOCAB_BLOCK classes: on CUDA each block's ``g.T @ h_c`` is one
    cuBLAS matmul with an fp32 output (fp32 accumulation inside, no rounding to bf16): written
    into the block for the first chunk (``mm(out_dtype=float32)``), added to it by the matmul
    itself after that (``addmm(out_dtype=float32)`` with the block as input and output), or, where
    torch refuses an fp32 input there, written into a reused scratch block then added; elsewhere
    each block's slice of the chunk is upcast for its matmul. :meth:`result` rounds block by
    block into the weight dtype and frees each fp32 block once copied, so the fp32 sum and the
    result never coexist whole.

    The same sum serves grad_hidden over the vocabulary blocks of ``strategy="vocab"``'s backward
    of ``none`` (``_WeightGrad(hidden)``, ``add(g_blk.T, W[blk])``: rows for classes).
    """

    VOCAB_BLOCK = 16384

    def __init__(self, weight: torch.Tensor):
        acc = acc_dtype(weight)
        n_cols = weight.shape[0]
        self.dtype, self.acc, self.shape, self.device = weight.dtype, acc, weight.shape, weight.device
        if acc == weight.dtype:
            self.whole = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            self.blocks = [self.whole[v : v + self.VOCAB_BLOCK] for v in range(0, n_cols, self.VOCAB_BLOCK)]
        else:
            self.whole = None
            self.blocks = [
                torch.zeros(min(self.VOCAB_BLOCK, n_cols - v), weight.shape[1], dtype=acc, device=weight.device)
                for v in range(0, n_cols, self.VOCAB_BLOCK)
            ]  # fmt: skip
        self.scratch = None
        self.empty = True  # no chunk added yet: the first product is written, not added

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        exact = self.whole is not None
        cuda = g.device.type in _Dispatch.MM_OUT_DTYPE_DEVICES and _Dispatch.mm_out_dtype_works
        upcast = not (exact or cuda)  # CPU: each block's slice of the chunk upcast for its matmul
        if upcast:
            h = h.to(self.acc)
        for i, block in enumerate(self.blocks):
            g_blk = g[:, i * self.VOCAB_BLOCK : i * self.VOCAB_BLOCK + block.shape[0]]
            if exact or upcast:
                block.addmm_(g_blk.t().to(block.dtype), h)
            else:
                self._add_fp32_product(block, g_blk, h)
        self.empty = False

    def _add_fp32_product(self, block, g_blk, h) -> None:
        if not self.empty and _Dispatch.addmm_out_dtype_works:
            # block += g.T @ h in one cuBLAS matmul that reads and writes the fp32 block (beta = 1):
            # no scratch, half the traffic of product-then-add. torch versions whose addmm(out_dtype)
            # wants `self` in the input dtype refuse it, once, and the scratch below is used.
            try:
                torch.addmm(block, g_blk.t(), h, out_dtype=block.dtype, out=block)
                return
            except (RuntimeError, NotImplementedError, TypeError):
                _Dispatch.addmm_out_dtype_works = False
        if self.scratch is None and not self.empty:
            self.scratch = torch.empty_like(self.blocks[0])
        scratch = block if self.empty else self.scratch[: block.shape[0]]
        try:
            torch.mm(g_blk.t(), h, out_dtype=scratch.dtype, out=scratch)
        except (RuntimeError, NotImplementedError, TypeError):  # a torch without mm(out_dtype)
            _Dispatch.mm_out_dtype_works = False
            block.addmm_(g_blk.t().to(block.dtype), h.to(block.dtype))
            return
        if scratch is not block:
            block += scratch

    def result(self) -> torch.Tensor:
        """The sum in the weight dtype (rounded once), freeing the fp32 blocks as it goes."""
        if self.whole is not None:
            return self.whole
        self.scratch = None
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for i in range(len(self.blocks)):
            out[i * self.VOCAB_BLOCK : i * self.VOCAB_BLOCK + self.blocks[i].shape[0]] = self.blocks[i]
            self.blocks[i] = None
        return out


class _InPlaceWeightGrad:
    """``grad_weight = sum over chunks of g.T @ h_c`` summed in the gradient's own storage and
    dtype (``acc_dtype`` = the weight's bf16/fp16), as Liger-Kernel and Cut Cross-Entropy do: the
    first chunk's product is written (``mm``), each later one added by the matmul itself
    (``addmm_``, beta = 1). Each product accumulates in fp32 inside the matmul and is added to the
    running sum before one rounding to the weight dtype: k chunks round the sum k times (relative
    error up to about k units of roundoff, against one for :class:`_WeightGrad`), and no fp32
    ``(V, d)`` buffer exists."""

    def __init__(self, weight: torch.Tensor):
        self.sum = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.empty = True

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        if self.empty:
            torch.mm(g.t(), h, out=self.sum)
        else:
            self.sum.addmm_(g.t(), h)
        self.empty = False

    def result(self) -> torch.Tensor:
        return self.sum


class _Dispatch:
    # mm(out_dtype=...) and addmm(out_dtype=...) are CUDA-only in torch (meta: planning runs follow
    # the CUDA path); each remembered once it has failed.
    MM_OUT_DTYPE_DEVICES = ("cuda", "meta")
    mm_out_dtype_works = True
    addmm_out_dtype_works = True


class _Grads:
    """The gradient buffers of one call and the per-chunk updates that fill them."""

    def __init__(self, hidden, weight, bias, need_hidden, need_weight, need_bias, sum_in_place=False):
        self.hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
        self.weight = (_InPlaceWeightGrad if sum_in_place else _WeightGrad)(weight) if need_weight else None
        self.bias = torch.zeros(bias.shape, dtype=acc_dtype(bias), device=bias.device) if need_bias else None
        self.need = (need_hidden, need_weight, need_bias)
        self.empty = hidden

    def add(self, rows: slice, g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        """Adds the contribution of the chunk ``rows`` whose dloss/dlogits is ``g``."""
        if self.need[0]:
            torch.mm(g, weight, out=self.hidden[rows])
        if self.weight is not None:
            self.weight.add(g, h)
        if self.bias is not None:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def result(self, bias: Optional[torch.Tensor]):
        """(grad_hidden, grad_weight, grad_bias) rounded once to their dtypes; empty when not needed."""
        grad_weight = self.weight.result() if self.weight is not None else self.empty.new_empty(0)
        grad_bias = self.bias.to(bias.dtype) if self.bias is not None else self.empty.new_empty(0)
        return self.hidden, grad_weight, grad_bias
