"""Sweep vector_norm's split-path programs per SM for every kind of ord on a GPU
(fusedls/backend/triton/tuning.py: VECTOR_NORM_SPLIT_PROGRAMS_PER_SM).

    python benchmarks/tune_vector_norm.py

For a 1 GiB tensor (bf16 and fp32, dim=None: the split path), the forward of each ord (2, 1, 0,
+-inf, 3) as a fraction of the copy bandwidth (x read once; copy reads and writes), ord +-inf
also with ``requires_grad`` (the tie counts are then computed too), at 2, 3 and 4 programs per
SM; then a (16384, 4096) tensor along dim=-1 (the row path). torch.linalg.vector_norm for
reference. About a minute on an H100.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusedls  # noqa: E402
from fusedls.backend.triton import tuning  # noqa: E402

ORDS = (2.0, 1.0, 0.0, float("inf"), float("-inf"), 3.0)
PER_SM = (2, 3, 4)


def _fraction(x: torch.Tensor, ms: float, copy_ms: float) -> float:
    """Read bandwidth of one pass over x in ``ms``, over the copy's (read + write in copy_ms)."""
    return (x.numel() * x.element_size() / ms) / (2 * x.numel() * x.element_size() / copy_ms)


def main() -> None:
    default = tuning.VECTOR_NORM_SPLIT_PROGRAMS_PER_SM
    print(torch.cuda.get_device_name())
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn((1 << 30) // dtype.itemsize, device="cuda", dtype=dtype)
        copy = do_bench(lambda: torch.empty_like(x).copy_(x), rep=200)
        xg = x.detach().requires_grad_()
        print(f"{dtype}, {x.numel()} elements, dim=None: torch ord 2 "
              f"{_fraction(x, do_bench(lambda: torch.linalg.vector_norm(x), rep=200), copy):.1%} of copy")  # fmt: skip
        for per_sm in PER_SM:
            tuning.VECTOR_NORM_SPLIT_PROGRAMS_PER_SM = per_sm
            cells = []
            for o in ORDS:
                cells.append(f"{o:g}: {_fraction(x, do_bench(lambda: fusedls.vector_norm(x, o), rep=200), copy):.1%}")
                if o in (float("inf"), float("-inf")):
                    ms = do_bench(lambda: fusedls.vector_norm(xg, o), rep=200)
                    cells.append(f"{o:g} with grad: {_fraction(x, ms, copy):.1%}")
            print(f"  programs per SM {per_sm}: " + ", ".join(cells), flush=True)
        tuning.VECTOR_NORM_SPLIT_PROGRAMS_PER_SM = default
        rows = torch.randn(16384, 4096, device="cuda", dtype=dtype)
        rcopy = do_bench(lambda: torch.empty_like(rows).copy_(rows))
        print(f"  (16384, 4096) dim=-1, ord 2: torch "
              f"{_fraction(rows, do_bench(lambda: torch.linalg.vector_norm(rows, dim=-1)), rcopy):.1%}, fusedls "
              f"{_fraction(rows, do_bench(lambda: fusedls.vector_norm(rows, dim=-1)), rcopy):.1%}")  # fmt: skip
        del x, xg, rows
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
