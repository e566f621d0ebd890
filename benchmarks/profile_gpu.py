"""Where the time of one forward + backward goes on a GPU: kernels (device time per call) against
the host's time per call and the wall time per call.

    python benchmarks/profile_gpu.py

For a few small, host-sensitive cases (bf16): cross_entropy 4096 x 32000, dropout 16384 x 2048,
vector_norm 16384 x 4096. Prints, per case and provider, the wall time per call with a sync
after each call, the host time per call without syncs (the launch rate), and each CUDA kernel's
device time per call (torch.profiler).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import fusedls  # noqa: E402


def _cases():
    x = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32000, (4096,), device="cuda")
    yield "cross_entropy", x, {
        "torch": lambda: F.cross_entropy(x, y, label_smoothing=0.1),
        "fusedls": lambda: fusedls.cross_entropy(x, y, label_smoothing=0.1),
    }
    d = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    yield "dropout", d, {
        "torch": lambda: F.dropout(d, 0.1).sum(),
        "fusedls": lambda: fusedls.dropout(d, 0.1).sum(),
    }
    v = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    yield "vector_norm", v, {
        "torch": lambda: torch.linalg.vector_norm(v, dim=-1).sum(),
        "fusedls": lambda: fusedls.vector_norm(v, dim=-1).sum(),
    }


def _step(fn, leaf):
    fn().backward()
    leaf.grad = None


def main() -> None:
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    for name, leaf, providers in _cases():
        for provider, fn in providers.items():
            for _ in range(5):
                _step(fn, leaf)
            torch.cuda.synchronize()
            n = 50
            start = time.perf_counter()
            for _ in range(n):
                _step(fn, leaf)
                torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / n * 1e6
            start = time.perf_counter()
            for _ in range(n):
                _step(fn, leaf)
            host = (time.perf_counter() - start) / n * 1e6
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    _step(fn, leaf)
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
            device = sum(e.self_device_time_total for e in kernels) / 10
            print(f"{name:14s} {provider:8s} wall {wall:8.1f} us  host {host:8.1f} us  kernels {device:8.1f} us")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]:
                print(f"    {e.count // 10:3d} x {e.key[:70]:70s} {e.self_device_time_total / 10:8.1f} us")


if __name__ == "__main__":
    main()
