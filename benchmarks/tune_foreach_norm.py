"""Sweep the multi-tensor kernels' chunk, chunks per work item, warps and merge step on a GPU
(fusedls/backend/triton/tuning.py).

    python benchmarks/tune_foreach_norm.py

On the benchmark's Llama-like parameter list (d = 2048, 22 layers: 201 bf16 tensors, 1.26e9
elements), for each (FOREACH_NORM_BLOCK, FOREACH_NORM_CHUNKS, FOREACH_NORM_WARPS): the time of
foreach_norm (reads every element once) and clip_grad_norm_ (reads twice, writes once), with the
fraction of the copy bandwidth (copy: read + write of the same bytes); then, at the configured
elementwise setting, each (FOREACH_NORM_MERGE_BLOCK, FOREACH_NORM_MERGE_WARPS). Settings of 8 to
32 elements a thread per chunk and at most 128 per work item; about 3-4 minutes on an H100 (most
of it compiling), cut short after BUDGET_S seconds. The fastest settings are listed at the end.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusedls  # noqa: E402
from fusedls.bench.foreach_norm import _param_shapes  # noqa: E402
from fusedls.backend.triton import tuning  # noqa: E402

BUDGET_S = 280  # the sweep stops starting new settings after this long
BLOCKS, CHUNKS, WARPS = (2048, 4096, 8192), (1, 2, 4, 8), (4, 8, 16)
MERGES = ((1024, 4), (4096, 4), (8192, 8), (16384, 16))


def _elementwise_settings() -> list[tuple[int, int, int]]:
    """(block, chunks, warps) with 8-32 elements a thread per chunk, at most 128 per item."""
    return [(b, c, w) for b, c, w in itertools.product(BLOCKS, CHUNKS, WARPS)
            if 8 <= b // (32 * w) <= 32 and c * b // (32 * w) <= 128]  # fmt: skip


def main() -> None:
    shapes = _param_shapes(22, 2048)
    flat = torch.randn(sum(torch.Size(s).numel() for s in shapes), device="cuda", dtype=torch.bfloat16)
    tensors = [v.view(s) for v, s in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in tensors]  # grads must match in shape and dtype
    for p, g in zip(params, tensors):
        p.grad = g
    n_bytes = flat.numel() * flat.element_size()
    dst = torch.empty_like(flat)
    copy = do_bench(lambda: dst.copy_(flat))  # moves 2 * n_bytes
    print(f"{torch.cuda.get_device_name()}: {len(tensors)} tensors, {flat.numel() / 1e9:.2f}e9 elements "
          f"({n_bytes / 1e9:.2f} GB); copy {copy:.3f} ms")  # fmt: skip
    print(f"torch._foreach_norm {do_bench(lambda: torch._foreach_norm(tensors, 2)):.3f} ms")
    print(f"torch clip_grad_norm_ {do_bench(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)):.3f} ms")
    start, results = time.monotonic(), []

    def measure(label: str) -> None:
        norm = do_bench(lambda: fusedls.foreach_norm(tensors))
        clip = do_bench(lambda: fusedls.clip_grad_norm_(params, 1e9))
        results.append((norm, clip, label))
        print(f"{label}: foreach_norm {norm:.3f} ms ({copy / 2 / norm:.2f} of copy), "
              f"clip {clip:.3f} ms ({copy * 1.5 / clip:.2f} of copy)", flush=True)  # fmt: skip

    default = (tuning.FOREACH_NORM_BLOCK, tuning.FOREACH_NORM_CHUNKS, tuning.FOREACH_NORM_WARPS)
    for block, chunks, warps in _elementwise_settings():
        if time.monotonic() - start > BUDGET_S:
            print(f"budget of {BUDGET_S} s reached: the remaining settings were skipped")
            break
        tuning.FOREACH_NORM_BLOCK, tuning.FOREACH_NORM_CHUNKS, tuning.FOREACH_NORM_WARPS = block, chunks, warps
        measure(f"block={block:5d} chunks={chunks} warps={warps:2d}")
    tuning.FOREACH_NORM_BLOCK, tuning.FOREACH_NORM_CHUNKS, tuning.FOREACH_NORM_WARPS = default
    for merge_block, merge_warps in MERGES:
        tuning.FOREACH_NORM_MERGE_BLOCK, tuning.FOREACH_NORM_MERGE_WARPS = merge_block, merge_warps
        measure(f"block={default[0]:5d} chunks={default[1]} warps={default[2]:2d} "
                f"merge_block={merge_block:5d} merge_warps={merge_warps:2d}")  # fmt: skip
    print("fastest foreach_norm:")
    for norm, clip, label in sorted(results)[:5]:
        print(f"  {label}: {norm:.3f} ms, clip {clip:.3f} ms")
    print("fastest clip_grad_norm_:")
    for norm, clip, label in sorted(results, key=lambda r: r[1])[:5]:
        print(f"  {label}: clip {clip:.3f} ms, foreach_norm {norm:.3f} ms")


if __name__ == "__main__":
    main()
