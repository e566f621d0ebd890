"""Sweep the multi-tensor kernels' chunk and warps on a GPU (fusedls/kernels/tuning.py).

    python benchmarks/tune_foreach_norm.py

On the benchmark's Llama-like parameter list (d = 2048, 22 layers: 201 bf16 tensors, 1.1e9
elements), for each (FOREACH_NORM_BLOCK, FOREACH_NORM_WARPS): the time of foreach_norm (reads
every element once) and clip_grad_norm_ (reads twice, writes once), with the fraction of the
copy bandwidth (copy: read + write of the same bytes).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusedls  # noqa: E402
from fusedls.bench.foreach_norm import _param_shapes  # noqa: E402
from fusedls.kernels import tuning  # noqa: E402


def main() -> None:
    shapes = _param_shapes(22, 2048)
    flat = torch.randn(sum(torch.Size(s).numel() for s in shapes), device="cuda", dtype=torch.bfloat16)
    tensors = [v.view(s) for v, s in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]
    params = [torch.nn.Parameter(torch.empty(0, device="cuda")) for _ in tensors]
    for p, g in zip(params, tensors):
        p.grad = g
    n_bytes = flat.numel() * flat.element_size()
    dst = torch.empty_like(flat)
    copy = do_bench(lambda: dst.copy_(flat))  # moves 2 * n_bytes
    print(f"{torch.cuda.get_device_name()}: {len(tensors)} tensors, {flat.numel() / 1e9:.2f}e9 elements; copy {copy:.3f} ms")
    print(f"torch._foreach_norm {do_bench(lambda: torch._foreach_norm(tensors, 2)):.3f} ms")
    print(f"torch clip_grad_norm_ {do_bench(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)):.3f} ms")
    for block, warps in itertools.product((2048, 4096, 8192, 16384, 32768), (4, 8, 16)):
        if not 4 <= block // (32 * warps) <= 64:
            continue
        tuning.FOREACH_NORM_BLOCK, tuning.FOREACH_NORM_WARPS = block, warps
        norm = do_bench(lambda: fusedls.foreach_norm(tensors))
        clip = do_bench(lambda: fusedls.clip_grad_norm_(params, 1e9))
        print(f"block={block:6d} warps={warps:2d}: foreach_norm {norm:.3f} ms ({copy / 2 / norm:.2f} of copy), "
              f"clip {clip:.3f} ms ({copy * 1.5 / clip:.2f} of copy)")


if __name__ == "__main__":
    main()
