"""Peak memory of the LM head + loss at full size, counted on the meta device (no GPU needed).

    python -m fusedls.bench.memory_model [--tokens 16384 ...] [--hidden 4096] [--vocab 128256 ...]
                                         [--dtype bf16] [--csv PATH]

For every (tokens, vocab) given, for forward + backward of the mean label-smoothed loss (``label_smoothing=0.1``, gradients of
hidden and weight), prints the peak bytes allocated by: torch's ``F.cross_entropy(F.linear(h, W))``,
and ``fusedls.linear_cross_entropy`` on the triton backend with each ``strategy`` (``auto``, the
default, is ``fusedls/triton``) and, for a half-precision head, with the weight gradient summed in
place (``acc_dtype`` the head's dtype: ``fusedls/triton+acc_dtype=bf16``, where ``auto`` takes the
token chunks), for
``reduction="mean"`` and ``"none"`` (summed), each with its ratio to torch. The count is
:class:`~fusedls.bench.live_bytes.LiveBytes` (every storage created by an ATen op, while alive;
the inputs not counted, the gradients counted) with the triton launchers run on meta tensors and
the kernels not launched (:func:`~fusedls.bench.live_bytes.triton_on_meta`); matmuls are torch's,
so the count is what ``torch.cuda.max_memory_allocated`` sees on a GPU, less the allocator's
rounding; on an H100 (bf16, 16384 x 4096 -> 128256) both gave the same figures for every provider
measured (benchmarks/results/memory-model/README.md).
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch
import torch.nn.functional as F

import fusedls

from .live_bytes import peak_live_bytes, triton_on_meta

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SMOOTHING = 0.1


def _peak(loss_fn, h: torch.Tensor, w: torch.Tensor) -> int:
    h.grad = w.grad = None
    peak = peak_live_bytes(lambda: loss_fn().backward())
    h.grad = w.grad = None
    return peak


def model(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> list[dict]:
    """One row per provider: ``provider``, ``reduction``, ``peak_bytes``, ``memory_vs_torch``."""
    h = torch.empty(tokens, hidden, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(vocab, hidden, device="meta", dtype=dtype, requires_grad=True)
    t = torch.zeros(tokens, device="meta", dtype=torch.long)
    torch_peak = _peak(lambda: F.cross_entropy(F.linear(h, w), t, label_smoothing=SMOOTHING), h, w)
    rows = [dict(provider="torch", reduction="mean", peak_bytes=torch_peak, memory_vs_torch=1.0)]
    variants = [(strategy, None) for strategy in fusedls.ops.linear_cross_entropy.STRATEGIES]
    if dtype.itemsize == 2:  # the weight gradient summed in place: a half-precision head only
        variants.append(("auto", dtype))
    for strategy, acc in variants:
        for reduction in ("mean", "none"):

            def loss():
                out = fusedls.linear_cross_entropy(h, w, t, label_smoothing=SMOOTHING, reduction=reduction,
                                                   strategy=strategy, acc_dtype=acc)  # fmt: skip
                return out.sum() if reduction == "none" else out

            with triton_on_meta(), fusedls.use_backend("triton"):
                peak = _peak(loss, h, w)
            provider = "fusedls/triton" + ("" if strategy == "auto" else f"+{strategy}")
            provider += f"+acc_dtype={_NAMES[acc]}" if acc is not None else ""
            rows.append(dict(provider=provider, reduction=reduction, peak_bytes=peak, memory_vs_torch=peak / torch_peak))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedls.bench.memory_model", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    table = []
    print(f"linear cross-entropy fwd+bwd peak memory (counted on meta), d = {args.hidden}, {args.dtype}")
    print(f"{'tokens':>7}{'vocab':>8}  {'provider':<36}{'reduction':<11}{'peak MiB':>10}{'vs torch':>10}")
    for tokens in args.tokens:
        for vocab in args.vocab:
            for r in model(tokens, args.hidden, vocab, DTYPES[args.dtype]):
                table.append(dict(tokens=tokens, hidden=args.hidden, vocab=vocab, dtype=args.dtype, **r))
                print(f"{tokens:>7}{vocab:>8}  {r['provider']:<36}{r['reduction']:<11}"
                      f"{r['peak_bytes'] / 2**20:>10.0f}{r['memory_vs_torch']:>10.3f}")
    if args.csv:
        write_csv(args.csv, table)
    return 0


def write_csv(path: str, table: list[dict]) -> None:
    """``table`` (dicts with the same keys) as a CSV file with a header line."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(table[0]))
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    sys.exit(main())
