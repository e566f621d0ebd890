"""Sweep ``strategy="vocab"``'s block size and tail on a GPU (fusedls/ops/linear_cross_entropy.py:
VOCAB_BLOCK_BYTES, VOCAB_TAIL_DIVISOR), on the Llama-3 8B head.

    python benchmarks/tune_linear_cross_entropy.py

hidden (16384, 4096) and head (128256, 4096) in bf16, ~1 % of targets ignored,
label_smoothing=0.1: forward + backward time (median of 8 after 2 warm-ups, gradients cleared
untimed) and peak extra memory for blocks of 256, 128, 64 and 32 MiB of logits, each with tail
divisor 1 (full blocks only: the blocks borrowed from the weight gradient stop where a full one no
longer fits, then one own full block) and 8 (borrowed blocks shrink down to 1/8, then an own
buffer of 1/8). About a minute on an H100.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fusedls  # noqa: E402
from fusedls.ops import linear_cross_entropy as lce  # noqa: E402

N, D, V = 16384, 4096, 128256
BLOCK_MIB = (256, 128, 64, 32)
TAIL_DIVISORS = (1, 8)


def main() -> None:
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::100] = -100

    def clear() -> None:
        h.grad = w.grad = None

    def step() -> None:
        fusedls.linear_cross_entropy(h, w, t, label_smoothing=0.1, strategy="vocab").backward()

    default = lce.VOCAB_BLOCK_BYTES["cuda"], lce.VOCAB_TAIL_DIVISOR
    print(f"{torch.cuda.get_device_name()}: strategy='vocab', {N} x {D} -> {V}, bf16, fwd+bwd")
    for mib, tail in ((m, t) for m in BLOCK_MIB for t in TAIL_DIVISORS):
        lce.VOCAB_BLOCK_BYTES["cuda"], lce.VOCAB_TAIL_DIVISOR = mib << 20, tail
        times = []
        for i in range(10):
            clear()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"  block {mib:4d} MiB, tail 1/{tail}: {statistics.median(times):8.2f} ms, peak {peak:7.1f} MiB",
              flush=True)  # fmt: skip
    lce.VOCAB_BLOCK_BYTES["cuda"], lce.VOCAB_TAIL_DIVISOR = default


if __name__ == "__main__":
    main()
