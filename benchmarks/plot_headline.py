"""The README's headline plot, drawn from the committed H100 results (no GPU needed).

    python benchmarks/plot_headline.py [--results DIR] [--out PNG]

Reads ``<op>.json`` in ``benchmarks/results/nvidia-h100-80gb-hbm3/`` (the files written by
``python -m fusedls.bench``) and draws two panels: the speed-up over torch eager of fusedls's
triton backend and of ``torch.compile`` for one headline case per op, and the peak extra memory
of the two losses and the fused dropout + add + RMSNorm against torch eager. Writes
``headline.png`` beside the data. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "nvidia-h100-80gb-hbm3"

# (label, op file, mode, dtype, rows, cols, fusedls provider): one headline case per op.
SPEED = (
    ("cross_entropy\n4096 x 128256", "cross_entropy", "fwd+bwd", "bf16", 4096, 128256, "fusedls/triton"),
    ("linear_cross_entropy\nLlama-3 8B head, 16k tokens", "linear_cross_entropy", "fwd+bwd", "bf16", 16384, 128256,
     "fusedls/triton"),
    ("dropout_add_rms_norm\n16384 x 8192", "dropout_add_rms_norm", "fwd+bwd", "bf16", 16384, 8192, "fusedls/triton"),
    ("dropout\n16384 x 8192", "dropout", "fwd+bwd", "bf16", 16384, 8192, "fusedls/triton"),
    ("vector_norm\n2^28 elements", "vector_norm", "fwd+bwd", "bf16", 1, 1 << 28, "fusedls/triton"),
    ("foreach_norm\n201 tensors", "foreach_norm", "fwd", "bf16", 22, 2048, "fusedls/triton"),
    ("clip_grad_norm_ (clips)\n201 tensors", "clip_grad_norm", "fwd", "bf16", 22, 2048, "fusedls/triton"),
    ("clip_grad_norm_ (within)\n201 tensors", "clip_grad_norm_within", "fwd", "bf16", 22, 2048, "fusedls/triton"),
    ("l2_penalty\n201 tensors", "l2_penalty", "fwd+bwd", "bf16", 22, 2048, "fusedls/triton"),
)  # fmt: skip
# (label, op file, mode, dtype, rows, cols, [(bar label, provider), ...]): peak extra memory.
MEMORY = (
    ("cross_entropy\n4096 x 128256", "cross_entropy", "fwd+bwd", "bf16", 4096, 128256,
     (("fusedls", "fusedls/triton"), ("fusedls, inplace_backward", "fusedls/triton+inplace"))),
    ("linear_cross_entropy\nLlama-3 8B head", "linear_cross_entropy", "fwd+bwd", "bf16", 16384, 128256,
     (("fusedls (auto: tokens)", "fusedls/triton"), ("fusedls, strategy='vocab'", "fusedls/triton+vocab"))),
    ("dropout_add_rms_norm\n16384 x 8192", "dropout_add_rms_norm", "fwd+bwd", "bf16", 16384, 8192,
     (("fusedls", "fusedls/triton"),)),
)  # fmt: skip
MIB = 2**20


def load(results: Path) -> dict:
    """``{op: (meta, rows)}`` of every op the plot needs."""
    ops = {case[1] for case in SPEED + MEMORY}
    found = {}
    for op in sorted(ops):
        data = json.loads((results / f"{op}.json").read_text())
        found[op] = data["meta"], data["rows"]
    return found


def row(data: dict, op: str, mode: str, dtype: str, rows: int, cols: int, provider: str) -> dict:
    """The one measured row of ``provider`` in that case (its second axis is named by meta's ``cols``)."""
    meta, all_rows = data[op]
    axis = meta["cols"]
    for r in all_rows:
        if (r["mode"], r["dtype"], r["rows"], r[axis], r["provider"]) == (mode, dtype, rows, cols, provider):
            if r["status"] not in ("ok", "above tol"):
                raise ValueError(f"{op} {provider} {rows} x {cols}: {r['status']}")
            return r
    raise ValueError(f"{op}: no {provider} row for {mode} {dtype} {rows} x {cols}")


def speedup(data: dict, case: tuple, provider: str) -> float | None:
    label, op, mode, dtype, rows, cols, _ = case
    try:
        mine = row(data, op, mode, dtype, rows, cols, provider)
    except ValueError:
        return None  # torch.compile is not measured for the multi-tensor ops
    torch_ms = row(data, op, mode, dtype, rows, cols, "torch")["median_ms"]
    return torch_ms / mine["median_ms"]


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.25, 1]})
    labels = [case[0] for case in SPEED]
    ys = range(len(SPEED))
    height = 0.38
    for offset, provider, name, color in ((-height / 2, None, "fusedls (triton)", "#1f77b4"),
                                          (height / 2, "torch.compile", "torch.compile", "#bbbbbb")):  # fmt: skip
        values = [speedup(data, case, provider or case[6]) for case in SPEED]
        bars = ax_speed.barh([y + offset for y in ys], [v or 0 for v in values], height, color=color, label=name)
        for bar, v in zip(bars, values):
            if v is not None:
                ax_speed.text(bar.get_width() * 1.03, bar.get_y() + bar.get_height() / 2, f"{v:.2f}x",
                              va="center", fontsize=8)  # fmt: skip
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_xlim(0.25, 8)
    ax_speed.set_xticks([0.25, 0.5, 1, 2, 4, 8], ["0.25x", "0.5x", "1x", "2x", "4x", "8x"])
    ax_speed.set_yticks(list(ys), labels, fontsize=8)
    ax_speed.invert_yaxis()
    ax_speed.set_xlabel("speed-up over torch eager (median time; > 1 is faster)")
    ax_speed.set_title("Time (forward + backward; foreach_norm and clip_grad_norm_: one call)", fontsize=10)
    ax_speed.legend(loc="lower right", fontsize=8)

    y = 0
    ticks, tick_labels = [], []
    for label, op, mode, dtype, rows, cols, bars in MEMORY:
        torch_mib = row(data, op, mode, dtype, rows, cols, "torch")["peak_bytes"] / MIB
        entries = [("torch eager", torch_mib, "#bbbbbb")] + [
            (name, row(data, op, mode, dtype, rows, cols, provider)["peak_bytes"] / MIB, "#1f77b4")
            for name, provider in bars
        ]
        start = y
        for name, mib, color in entries:
            ax_mem.barh(y, mib, 0.8, color=color)
            text = f"{name}: {mib:,.0f} MiB" + ("" if color != "#1f77b4" else f" ({mib / torch_mib:.2f}x torch)")
            ax_mem.text(mib + 150, y, text, va="center", fontsize=8)
            y += 1
        ticks.append((start + y - 1) / 2)
        tick_labels.append(label)
        y += 0.8
    ax_mem.set_xlim(0, 19000)
    ax_mem.set_xticks([0, 4000, 8000, 12000], ["0", "4000", "8000", "12000"])
    ax_mem.set_yticks(ticks, tick_labels, fontsize=8)
    ax_mem.invert_yaxis()
    ax_mem.set_xlabel("peak extra memory, MiB (less is better)")
    ax_mem.set_title("Memory (forward + backward)", fontsize=10)

    meta = data["cross_entropy"][0]
    versions = meta["versions"]
    fig.suptitle(f"fusedls on {meta['device']}, bf16 (torch {versions['torch']}, triton {versions['triton']}, "
                 f"{meta['date_utc'][:10]}; data: benchmarks/results/{meta['device_slug']}/)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/plot_headline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the <op>.json files")
    parser.add_argument("--out", type=Path, help="default: headline.png in --results")
    args = parser.parse_args(argv)
    plot(load(args.results), args.out or args.results / "headline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
