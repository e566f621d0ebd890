"""cuBLAS (torch.mm) against the best Triton GEMM inductor's max-autotune finds, on the matmuls of
``linear_cross_entropy`` for the Llama-3 8B head (bf16): does a Triton matmul win any of them?

    python benchmarks/compare_matmul_backends.py

The shapes (M x K @ K x N), all in bf16 with fp32 accumulation:

* tokens / vocab pass 1: logits of a 4096-token chunk, 4096 x 4096 @ 4096 x 128256;
  grad_hidden of that chunk, 4096 x 128256 @ 128256 x 4096;
* tokens: one 16384-class block's grad_weight product of a chunk, 16384 x 4096 @ 4096 x 4096;
* vocab pass 2: a block's logits for all tokens, 16384 x 4096 @ 4096 x 8192, and its grad_weight,
  8192 x 16384 @ 16384 x 4096.

cuBLAS: ``torch.mm``. Triton: ``torch.compile(mode="max-autotune-no-cudagraphs")`` with
``max_autotune_gemm_backends = "TRITON"`` (inductor benchmarks its Triton templates and keeps the
fastest). Each is timed as the median of 20 runs after 3 warm-ups (CUDA events), and reported
in TFLOP/s. Autotuning takes a minute or two. A shape Triton cannot compile says why; the result
is the same matrix either way (checked against torch.mm in fp32: max relative error).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = (  # (what, M, K, N)
    ("logits of a 4096-token chunk", 4096, 4096, 128256),
    ("grad_hidden of that chunk", 4096, 128256, 4096),
    ("tokens: grad_weight block of a chunk", 16384, 4096, 4096),
    ("vocab: a block's logits, all tokens", 16384, 4096, 8192),
    ("vocab: a block's grad_weight", 8192, 16384, 4096),
)


def median_ms(fn, a: torch.Tensor, b: torch.Tensor) -> float:
    for _ in range(3):
        fn(a, b)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: bf16 GEMMs of linear_cross_entropy, TFLOP/s")
    for what, m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        flop = 2.0 * m * k * n
        cublas = median_ms(torch.mm, a, b)
        line = f"  {what:38s} {m:6d} x {k:6d} @ {n:6d}: cuBLAS {flop / cublas / 1e9:6.0f}"
        try:
            torch._dynamo.reset()
            triton_mm = torch.compile(lambda x, y: x @ y, mode="max-autotune-no-cudagraphs", dynamic=False)
            ms = median_ms(triton_mm, a, b)
            ref = torch.mm(a, b).float()
            err = float(((triton_mm(a, b).float() - ref).abs().max() / ref.abs().max()))
            line += f", Triton {flop / ms / 1e9:6.0f} ({cublas / ms:.2f}x cuBLAS's speed, max rel. error {err:.1e})"
        except Exception as exc:  # a template that does not compile for this shape or GPU
            line += f", Triton failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(line, flush=True)
        del a, b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
