"""Python profile (cProfile) of the host side of fusedls calls on a GPU: where the launch time goes.

    python benchmarks/profile_host.py [op]   # op: cross_entropy (default), vector_norm, dropout
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fusedls  # noqa: E402


def main() -> None:
    op = sys.argv[1] if len(sys.argv) > 1 else "cross_entropy"
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 4096, (64,), device="cuda")
    fn = {
        "cross_entropy": lambda: fusedls.cross_entropy(x, y, label_smoothing=0.1),
        "vector_norm": lambda: fusedls.vector_norm(x, dim=-1).sum(),
        "dropout": lambda: fusedls.dropout(x, 0.1).sum(),
    }[op]
    for _ in range(20):
        fn().backward()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        fn().backward()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
