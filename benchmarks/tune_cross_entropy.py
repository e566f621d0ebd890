"""Sweep the cross-entropy launch parameters on a GPU (fusedls/backend/triton/tuning.py).

    python benchmarks/tune_cross_entropy.py [--quick]
    python benchmarks/tune_cross_entropy.py --paths [--quick]

For each shape (bf16, label_smoothing=0.1, reduction mean, forward + backward) and each
(block_c, num_warps, L2_FRACTION, MAX_PROGRAMS_PER_SM) of the chunked path, prints the median time and the fraction
of the device's copy bandwidth (bytes: read the logits once, write the gradient once), then the
best configuration per shape. ``--paths`` compares the forward's paths instead (chunked,
register-resident where the row fits, split rows with slices of 4096 / 8192 / 16384 classes, and
the split path's two-phase variant) on the same shapes and 8 x 256000, and prints the fastest per
shape: what CROSS_ENTROPY_RESIDENT_MAX, CROSS_ENTROPY_SPLIT_BLOCK / _WARPS / _MIN_COLS should hold.
Also prints, for the smallest shape, the time of the kernels alone
against the wall time of a call (the host overhead of the Python layers).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusedls  # noqa: E402
from fusedls.backend.triton import cross_entropy as kernels  # noqa: E402
from fusedls.backend.triton import tuning  # noqa: E402

SHAPES = ((1024, 32000), (4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256), (4096, 256000))
FEW_ROWS = ((8, 256000),)
# path -> tuning table settings (everything else as committed); a slice of b classes on b // 256
# warps holds 32 logits a thread
_OFF = dict(CROSS_ENTROPY_RESIDENT_MAX={2: 0, 4: 0}, CROSS_ENTROPY_SPLIT_BLOCK={2: 0, 4: 0})
PATHS = {
    "chunked": _OFF,
    "resident": dict(CROSS_ENTROPY_SPLIT_BLOCK={2: 0, 4: 0}),
    **{f"split{b}": dict(CROSS_ENTROPY_RESIDENT_MAX={2: 0, 4: 0}, CROSS_ENTROPY_SPLIT_BLOCK={2: b, 4: b},
                         CROSS_ENTROPY_SPLIT_WARPS=b // 256, CROSS_ENTROPY_SPLIT_MIN_COLS={2: 0, 4: 0},
                         CROSS_ENTROPY_SPLIT_COOPERATIVE=True)
       for b in (4096, 8192, 16384)},
    "split8192-two-phase": dict(CROSS_ENTROPY_RESIDENT_MAX={2: 0, 4: 0}, CROSS_ENTROPY_SPLIT_MIN_COLS={2: 0, 4: 0},
                                CROSS_ENTROPY_SPLIT_COOPERATIVE=False),
}  # fmt: skip


def _step(x, y):
    loss = fusedls.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()


def _copy_ms(n_bytes: int) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.bfloat16, device="cuda")  # n_bytes counts read + write
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), warmup=25, rep=100)


def _host_overhead(x, y) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        _step(x, y)
        x.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            _step(x, y)
            x.grad = None
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def compare_paths(shapes) -> None:
    """Each path of PATHS on each shape: time, fraction of copy; the fastest per shape."""
    for rows, vocab in shapes:
        x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, vocab, (rows,), device="cuda")
        copy = _copy_ms(2 * x.numel() * x.element_size())
        results = []
        for name, settings in PATHS.items():
            if name == "resident" and vocab > tuning.CROSS_ENTROPY_RESIDENT_MAX[2]:
                continue
            saved = {k: getattr(tuning, k) for k in settings}
            for k, v in settings.items():
                setattr(tuning, k, v)

            def run():
                _step(x, y)
                x.grad = None

            try:
                ms = do_bench(run, warmup=10, rep=60)
            finally:
                for k, v in saved.items():
                    setattr(tuning, k, v)
            results.append((ms, name))
            print(f"{rows}x{vocab} {name}: {ms:.3f} ms, {copy / ms:.2f} of copy")
        best = min(results)
        print(f"BEST {rows}x{vocab}: {best[1]} {best[0]:.3f} ms = {copy / best[0]:.2f} of copy ({copy:.3f} ms)")
        del x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paths", action="store_true", help="compare the forward's paths (module docstring)")
    parser.add_argument("--profile", action="store_true", help="host-overhead profile of the smallest shape")
    args = parser.parse_args()
    if args.paths:
        print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
        compare_paths((SHAPES[1::2] if args.quick else SHAPES) + FEW_ROWS)
        return
    blocks = (4096, 8192, 16384)
    warps = (8, 16, 32)
    fractions = (0.7, 2.0, 1000.0)
    per_sm = (8, 16)
    shapes = SHAPES[1::2] if args.quick else SHAPES
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    original = kernels.cross_entropy_config
    for k, v in _OFF.items():  # the chunked path, whose chunk and programs this sweep tunes
        setattr(tuning, k, v)
    for rows, vocab in shapes:
        x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, vocab, (rows,), device="cuda")
        n_bytes = 2 * x.numel() * x.element_size()
        copy = _copy_ms(n_bytes)
        results = []
        for block, w, frac, sm in itertools.product(blocks, warps, fractions, per_sm):
            if block // (32 * w) < 4 or block // (32 * w) > 64:
                continue
            kernels.cross_entropy_config = lambda n, e, b=block, w=w: tuning.LaunchConfig(
                max(16, min(triton.next_power_of_2(n), b)), w
            )
            tuning.L2_FRACTION, tuning.MAX_PROGRAMS_PER_SM = frac, sm

            def run():
                _step(x, y)
                x.grad = None

            ms = do_bench(run, warmup=10, rep=60)
            results.append((ms, block, w, frac, sm))
            print(f"{rows}x{vocab} block={block} warps={w} l2={frac} per_sm={sm}: {ms:.3f} ms, {copy / ms:.2f} of copy")
        kernels.cross_entropy_config = original
        best = min(results)
        print(f"BEST {rows}x{vocab}: block={best[1]} warps={best[2]} l2={best[3]} per_sm={best[4]} "
              f"{best[0]:.3f} ms = {copy / best[0]:.2f} of copy ({copy:.3f} ms)")
        del x, y
    if args.profile:
        x = torch.randn(1024, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 32000, (1024,), device="cuda")
        _host_overhead(x, y)


if __name__ == "__main__":
    main()
