"""Sweep ``strategy="vocab"``'s buffers on a GPU (CHUNK_BYTES of fusedls/ops/linear_cross_entropy_tokens.py
for pass 1's token chunks, which live in the weight gradient's storage; VOCAB_BLOCK_BYTES and
VOCAB_TAIL_DIVISOR of linear_cross_entropy_vocab.py for pass 2's blocks), on the Llama-3 8B head,
next to torch and the token chunks timed the same way.

    python benchmarks/tune_linear_cross_entropy.py

hidden (16384, 4096) and head (128256, 4096) in bf16, ~1 % of targets ignored,
label_smoothing=0.1: forward + backward time (median of 8 after 2 warm-ups, gradients cleared
untimed) and peak extra memory. Rows: pass-1 chunks of 256 MiB of logits and 1 GiB (the default:
4 chunks of 4096 tokens); pass-2 blocks of 512, 256 (the default), 128 and 64 MiB; tail divisor 1
(full blocks only: the blocks borrowed from the weight gradient stop where a full one no longer
fits, then one own full block) and 8 (the default: borrowed blocks shrink down to 1/8, then an own
buffer of 1/8). Then the token chunks with the weight gradient summed in place (``acc_dtype`` the
head's bf16, no fp32 (V, d) sum; what ``auto`` picks with it). Then ``strategy="fused"`` (the
logits-free Triton GEMM), exact and with ``filter_eps`` (FILTER_EPS) on the same random head (few
tiles skipped: its worst case) and on the trained-like peaked distribution of
``fusedls.bench.linear_cross_entropy.peaked_inputs``, and the value ``FUSED_TIME_VS_TOKENS`` of
``fusedls/ops/linear_cross_entropy_fused.py`` takes from this run (the fused time over the token
chunks'). About two minutes on an H100.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedls  # noqa: E402
from fusedls.bench.linear_cross_entropy import peaked_inputs  # noqa: E402
from fusedls.ops import linear_cross_entropy_tokens as lct  # noqa: E402
from fusedls.ops import linear_cross_entropy_vocab as lcv  # noqa: E402

N, D, V = 16384, 4096, 128256
FILTER_EPS = (1e-5, 1e-4)  # filter_eps of the fused rows
# (pass-1 chunk MiB, pass-2 block MiB, tail divisor); the first is the nearest to the layout of the
# H100 timing in benchmarks/results/nvidia-h100-80gb-hbm3/ (256 MiB chunks, full 256 MiB blocks,
# both in own buffers there)
CONFIGS = (
    (256, 256, 1), (256, 256, 8), (1024, 256, 8), (1024, 256, 1), (1024, 512, 8), (1024, 128, 8), (1024, 64, 8),
)  # fmt: skip


def main() -> None:
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::100] = -100

    def clear() -> None:
        h.grad = w.grad = None

    def step(strategy: str, acc_dtype=None, filter_eps=None) -> None:
        fusedls.linear_cross_entropy(h, w, t, label_smoothing=0.1, strategy=strategy, acc_dtype=acc_dtype,
                                     filter_eps=filter_eps).backward()  # fmt: skip

    def timed(step) -> tuple[float, float]:
        """(median ms, peak extra MiB) of step()."""
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
        clear()
        return statistics.median(times), peak

    print(f"{torch.cuda.get_device_name()}: {N} x {D} -> {V}, bf16, label_smoothing=0.1, fwd+bwd", flush=True)
    torch_ms, torch_peak = timed(lambda: F.cross_entropy(F.linear(h, w), t, label_smoothing=0.1).backward())
    print(f"  torch F.linear + F.cross_entropy: {torch_ms:8.2f} ms, peak {torch_peak:7.1f} MiB", flush=True)
    ms, peak = timed(lambda: step("tokens"))
    print(f"  strategy='tokens': {ms:8.2f} ms ({ms / torch_ms:.3f}x), peak {peak:7.1f} MiB "
          f"({peak / torch_peak:.3f}x)", flush=True)  # fmt: skip
    default = lct.CHUNK_BYTES["cuda"], lcv.VOCAB_BLOCK_BYTES["cuda"], lcv.VOCAB_TAIL_DIVISOR
    for chunk, block, tail in CONFIGS:
        lct.CHUNK_BYTES["cuda"], lcv.VOCAB_BLOCK_BYTES["cuda"], lcv.VOCAB_TAIL_DIVISOR = chunk << 20, block << 20, tail
        ms, peak = timed(lambda: step("vocab"))
        print(f"  strategy='vocab', chunk {chunk:4d} MiB, block {block:3d} MiB, tail 1/{tail}: {ms:8.2f} ms "
              f"({ms / torch_ms:.3f}x), peak {peak:7.1f} MiB ({peak / torch_peak:.3f}x)", flush=True)  # fmt: skip
    lct.CHUNK_BYTES["cuda"], lcv.VOCAB_BLOCK_BYTES["cuda"], lcv.VOCAB_TAIL_DIVISOR = default
    for chunk in (256, 1024):  # the sum in place: every chunk after the first adds into the bf16 gradient
        lct.CHUNK_BYTES["cuda"] = chunk << 20
        ms, peak = timed(lambda: step("tokens", torch.bfloat16))
        print(f"  strategy='tokens', acc_dtype=bf16 (sum in place), chunk {chunk:4d} MiB: {ms:8.2f} ms "
              f"({ms / torch_ms:.3f}x), peak {peak:7.1f} MiB ({peak / torch_peak:.3f}x)", flush=True)  # fmt: skip
    lct.CHUNK_BYTES["cuda"] = default[0]
    tokens_ms = timed(lambda: step("tokens"))[0]
    ms, peak = timed(lambda: step("fused"))
    print(f"  strategy='fused': {ms:8.2f} ms ({ms / torch_ms:.3f}x), peak {peak:7.1f} MiB ({peak / torch_peak:.3f}x); "
          f"FUSED_TIME_VS_TOKENS = {ms / tokens_ms:.3f}", flush=True)  # fmt: skip
    for eps in FILTER_EPS:
        ms, peak = timed(lambda: step("fused", filter_eps=eps))
        print(f"  strategy='fused', filter_eps={eps:g}, random head: {ms:8.2f} ms ({ms / torch_ms:.3f}x), peak "
              f"{peak:7.1f} MiB ({peak / torch_peak:.3f}x)", flush=True)  # fmt: skip
    ph, pw, pt = peaked_inputs(N, V, D, torch.bfloat16, "cuda")
    h.data, w.data, t.data = ph, pw, pt  # the same tensors (and closures), peaked values
    for eps in (None, *FILTER_EPS):
        ms, peak = timed(lambda: step("fused", filter_eps=eps))
        print(f"  strategy='fused', filter_eps={eps}, peaked distribution: {ms:8.2f} ms ({ms / torch_ms:.3f}x of "
              f"torch on the random head), peak {peak:7.1f} MiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
