"""The cpp backend's goal on CPU, measured: ``python -m fusedls.bench.cpu_goal``.

Goal (issue #7): forward + backward of label-smoothing cross-entropy on ``(N, V) = (2048,
32000)`` logits, fp32 and bf16, at least 3x faster than eager ``F.cross_entropy(...,
label_smoothing=0.1)`` and at least 1.2x faster than ``torch.compile`` of that same call.

The providers run interleaved in one process (round r times every provider once, in turn), so
a change of machine load hits them all alike; the report gives each one's median, the
speed-ups of the medians, torch's thread count and the load average before and after.
Every call gets the same logits (restored untimed) and a cleared gradient. Options:
``--rows``, ``--vocab``, ``--dtypes``, ``--rounds``, ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fusedls
import fusedls.backend.cpp

SMOOTHING = 0.1


def _eager(x, t):
    return F.cross_entropy(x, t, label_smoothing=SMOOTHING)


def _fusedls(inplace: bool):
    def loss(x, t):
        with fusedls.use_backend("cpp"):
            return fusedls.cross_entropy(x, t, label_smoothing=SMOOTHING, inplace_backward=inplace)

    return loss


def providers() -> dict:
    return {
        "torch": _eager,
        "torch.compile": torch.compile(_eager, dynamic=False),
        "fusedls/cpp": _fusedls(False),
        "fusedls/cpp+inplace": _fusedls(True),
    }


def measure(rows: int, vocab: int, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward per provider (interleaved rounds)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, vocab, generator=gen).to(dtype)
    t = torch.randint(0, vocab, (rows,), generator=gen)
    x = x0.clone().requires_grad_()
    fns = providers()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 2):  # two warm-up rounds (compilation, allocator)
        for name, fn in fns.items():
            with torch.no_grad():
                x.copy_(x0)
            x.grad = None
            start = time.perf_counter()
            fn(x, t).backward()
            elapsed = time.perf_counter() - start
            if r >= 2:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fusedls.backend.cpp.load()
    load_before = os.getloadavg()
    print(f"cpp kernels: {fusedls.backend.cpp.capability()} | torch threads: {torch.get_num_threads()} | "
          f"N={args.rows} V={args.vocab} label_smoothing={SMOOTHING}, forward + backward, {args.rounds} rounds")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name in args.dtypes.split(","):
        med = measure(args.rows, args.vocab, dtypes[name], args.rounds)
        ours = med["fusedls/cpp"]
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
        print(f"{name}: fusedls/cpp is {med['torch'] / ours:.2f}x eager (goal 3x), "
              f"{med['torch.compile'] / ours:.2f}x torch.compile (goal 1.2x); "
              f"+inplace {med['torch'] / med['fusedls/cpp+inplace']:.2f}x / "
              f"{med['torch.compile'] / med['fusedls/cpp+inplace']:.2f}x")
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
