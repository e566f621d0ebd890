"""Running a sweep: cases x providers for each op, progress, table, files, plots, exit status."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
import time
from pathlib import Path

import torch

from . import load_ops, report
from .core import MODES, OpBench, expand, wrong

# Seconds of timing per measurement (each provider of each case, and the copy baseline).
BUDGET_S = {"cuda": 0.2, "cpu": 0.3, "cpu-quick": 0.15, "cuda-quick": 0.1}


@dataclasses.dataclass
class BenchRun:
    """What :func:`run` did: per op, its metadata and rows; the files written; the exit status."""

    exit_code: int
    out: Path
    results: dict[str, dict]  # op name -> {"meta": ..., "rows": [...]}
    files: list[Path]
    wall_s: float


def _select(providers, patterns):
    if not patterns:
        return providers
    chosen = [p for p in providers if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"--providers {patterns} matches none of {[p.name for p in providers]}")
    return chosen


def _case_key(row: dict, op: OpBench) -> tuple:
    return MODES.index(row["mode"]), row["dtype"], row["rows"], row[op.cols_key]


def _merged(op: OpBench, old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with every case that ``new`` redoes replaced by it (all its providers), in case order."""
    if not old:
        return new
    redone = {_case_key(r, op) for r in new}
    return sorted([r for r in old if _case_key(r, op) not in redone] + new, key=lambda r: _case_key(r, op))


def run(
    ops=None, *, device=None, quick=False, modes=None, dtypes=None, rows=None, cols=None, providers=None,
    out=None, plot=True, threads=None, budget_s=None, merge=False, progress=True, command=None, echo=print,
) -> BenchRun:  # fmt: skip
    """Run the sweep of ``ops`` (default: all) on ``device`` (default: cuda if present, else cpu).

    ``modes``/``dtypes``/``rows``/``cols`` replace that axis of every slice of the op's sweep;
    ``providers`` are fnmatch patterns of provider names; ``merge`` keeps the cases of an earlier
    ``<op>.json`` in ``out`` that this run does not redo (a case redone is replaced whole). Files
    are rewritten after every case, so an interrupted run leaves what it measured. ``echo``
    prints the table. ``exit_code`` is 1 if a fusedls result was wrong (out of tolerance, or an
    error other than out-of-memory).
    """
    started, cpu_use = time.perf_counter(), report.OtherCpuUse()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as tests/conftest.py sets it
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available")
    if threads:
        torch.set_num_threads(threads)
    sweep = device.type + ("-quick" if quick else "")
    budget = budget_s or BUDGET_S[sweep]
    out = Path(out) if out else report.default_out(device)
    command = command if command is not None else [Path(sys.argv[0]).name] + sys.argv[1:]
    plan = []
    for op in load_ops(ops).values():
        cases = expand(op.sweeps[sweep], modes, dtypes, rows, cols)
        if cases:
            plan.append((op, cases, _select(op.providers(), providers)))
    bar = report.Progress(sum(len(cases) for _, cases, _ in plan), enabled=progress)
    results, files, failed = {}, [], False
    try:
        for op, cases, chosen in plan:
            earlier_meta, earlier = report.load(out / f"{op.name}.json") if merge else ({}, [])
            runs = earlier_meta.get("runs", []) + [{"date_utc": report.now(), "command": " ".join(command)}]
            op_rows: list[dict] = []
            for case in cases:
                bar.start_case(f"{op.name} {case.mode} {case.dtype} {case.rows}x{case.cols}")
                op_rows += op.run(case, chosen, device, budget, on_provider=bar.step)
                bar.end_case()
                all_rows = _merged(op, earlier, op_rows)
                meta = report.metadata(op, device, command, all_rows, cpu_use)
                meta.update(complete=False, wall_s=round(time.perf_counter() - started, 1), runs=runs)
                report.write_files(out, op, meta, all_rows)
            meta["complete"] = True
            op_files = report.write_files(out, op, meta, all_rows)
            results[op.name] = {"meta": meta, "rows": all_rows}
            failed |= any(wrong(r) for r in op_rows)
            png = report.plot(out, op, meta, all_rows) if plot else None
            files += op_files + ([png] if png else []) + op.extra_files(out, meta, all_rows, plot)
    finally:
        bar.close()
    for op, _, _ in plan:
        echo(report.format_meta(results[op.name]["meta"]))
        echo(report.format_table(op, results[op.name]["rows"]) + "\n")
    wall = time.perf_counter() - started
    echo(f"# wrote {', '.join(str(f) for f in files)}")
    if plot and not any(f.suffix == ".png" for f in files):
        echo("# no plot: matplotlib is not installed (pip install matplotlib)")
    echo(f"# wall time {wall:.1f} s" + ("; a fusedls result was WRONG (exit status 1)" if failed else ""))
    return BenchRun(1 if failed else 0, out, results, files, wall)
