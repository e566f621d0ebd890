"""The error of ``acc_dtype`` (how ``linear_cross_entropy`` sums the weight gradient over token
chunks) against the float64 truth, on the CPU, at the Llama-3 8B head's token count and width.

    python benchmarks/acc_dtype_error.py [--tokens 16384] [--hidden 4096] [--classes 4096]
                                         [--chunk 1024] [--csv PATH]

hidden ``(tokens, hidden)`` and a head of ``classes`` rows, bf16, both ``randn`` (the head scaled
to logits of a few units), class-id targets with ~1 % ignored, ``label_smoothing=0.1``, mean;
forward + backward of ``fusedls.linear_cross_entropy(..., strategy="tokens", chunk_size=chunk)``
with ``acc_dtype=None`` (exact fp32 sum, rounded once) and ``acc_dtype=torch.bfloat16`` (summed in
place in the bf16 gradient, one rounding per chunk), and torch's materialised
``F.cross_entropy(F.linear(h, W))`` in bf16; each gradient against float64 computed from the same
bf16 values. ``chunk=1024`` gives the 16 chunks the default chunking takes on a GPU for the full
head (16384 x 4096 -> 128256 bf16) with ``acc_dtype=bf16`` (a vocabulary block's 256 MiB of logits
per chunk; the exact sum takes 4 chunks of 4096 there); the head is a subset of its rows
(``--classes``), since the whole head's three matmuls take hours on a CPU: each weight-gradient row
is a sum over every token, the quantity whose rounding ``acc_dtype`` decides. Prints, per path,
the relative error of grad_weight and grad_hidden in the Frobenius norm and the largest element
error over the largest element.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedls  # noqa: E402

SMOOTHING, IGNORE_INDEX = 0.1, -100


def truth(h, w, t, chunk: int):
    """float64 (grad_hidden, grad_weight) of the mean smoothed loss, chunk by chunk."""
    h64, w64 = h.double(), w.double()
    valid = t != IGNORE_INDEX
    n_valid, n_cols = valid.sum().double(), w.shape[0]
    grad_h, grad_w = torch.empty_like(h64), torch.zeros_like(w64)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        g = torch.softmax(h64[rows] @ w64.T, 1) - SMOOTHING / n_cols
        y = t[rows].clamp_min(0)
        g[torch.arange(len(y)), y] -= 1 - SMOOTHING
        g *= valid[rows, None] / n_valid
        grad_h[rows] = g @ w64
        grad_w += g.T @ h64[rows]
    return grad_h, grad_w


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = got.double() - want
    return float(diff.norm() / want.norm()), float(diff.abs().max() / want.abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(args.classes, args.hidden, generator=gen) * (2 / args.hidden**0.5)).bfloat16().requires_grad_()
    t = torch.randint(0, args.classes, (args.tokens,), generator=gen)
    t[torch.rand(args.tokens, generator=gen) < 0.01] = IGNORE_INDEX
    start = time.perf_counter()
    want_h, want_w = truth(h.detach(), w.detach(), t, args.chunk)
    print(f"{args.tokens} x {args.hidden} -> {args.classes} classes, bf16, chunks of {args.chunk}: float64 truth in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    paths = {
        "fusedls acc_dtype=None (exact fp32 sum)": lambda: fusedls.linear_cross_entropy(
            h, w, t, label_smoothing=SMOOTHING, strategy="tokens", chunk_size=args.chunk),
        "fusedls acc_dtype=bf16 (sum in place)": lambda: fusedls.linear_cross_entropy(
            h, w, t, label_smoothing=SMOOTHING, strategy="tokens", chunk_size=args.chunk, acc_dtype=torch.bfloat16),
        "torch F.linear + F.cross_entropy (bf16)": lambda: F.cross_entropy(
            F.linear(h, w), t, label_smoothing=SMOOTHING),
    }  # fmt: skip
    rows = []
    for name, loss in paths.items():
        h.grad = w.grad = None
        start = time.perf_counter()
        loss().backward()
        seconds = time.perf_counter() - start
        (w_norm, w_max), (h_norm, h_max) = errors(w.grad, want_w), errors(h.grad, want_h)
        rows.append(dict(path=name, tokens=args.tokens, hidden=args.hidden, classes=args.classes, chunk=args.chunk,
                         grad_weight_rel_norm=w_norm, grad_weight_rel_max=w_max, grad_hidden_rel_norm=h_norm,
                         grad_hidden_rel_max=h_max, seconds=seconds))  # fmt: skip
        print(f"  {name:<42} grad_weight {w_norm:.2e} (norm) {w_max:.2e} (max) | grad_hidden {h_norm:.2e} "
              f"{h_max:.2e} | {seconds:.0f} s", flush=True)  # fmt: skip
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
