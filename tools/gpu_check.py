"""``python -m tools.gpu_check``: everything a GPU machine can tell about fusedls, in one command.

On a machine with a CUDA GPU and torch + triton installed (no network, no pip needed), from a
checkout of the repository:

1. tests: ``python -m pytest -x -q`` with ``TRITON_INTERPRET`` unset, so the tests run on CUDA
   tensors with compiled Triton kernels (skipped, saying why, when pytest or hypothesis is
   missing or there is no ``tests/`` folder) -> ``tests.log``;
2. aot: ``python -m tools.aot`` (registers, spills, vector loads of every kernel) -> ``aot.txt``;
3. bench: the full benchmark sweep (``python -m fusedls.bench``) -> ``<op>.json``, ``<op>.csv``,
   ``<op>.png``, and its table in ``bench.txt``;
4. a summary (test counts; per case the fusedls triton provider's speed-up over torch eager,
   fraction of the copy bandwidth and peak memory in logits buffers) -> ``summary.md``.

Everything goes to ``benchmarks/results/<device-slug>/`` (``--out`` to change). ``--quick`` runs
the AOT and benchmark subsets. Options this command does not know are passed to the benchmark
(``--mode fwd+bwd --rows 4096 --merge``, ...). Exit status: 0 when every step passed, 1 when one
failed (a test, a compile or spill, a wrong fusedls result), 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fusedls.bench import report
from fusedls.bench.__main__ import parser as bench_parser
from fusedls.bench.__main__ import run_args

GOALS = "bf16 fwd+bwd: >= 85 % of copy bandwidth, >= 3x torch eager, peak <= 1 logits buffer (inplace: ~0)"


def _tee(cmd: list[str], log: Path, cwd: Path, env: dict) -> tuple[int, str]:
    """Run ``cmd``, echoing its output and saving it to ``log``; (exit status, output)."""
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    lines = []
    with log.open("w") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True) as proc:  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            lines.append(line)
    return proc.returncode, "".join(lines)


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_tests(out: Path, env: dict) -> dict:
    root = report.REPO
    if not (root / "tests").is_dir():
        return {"status": f"skipped: no tests/ folder next to {root / 'fusedls'} (run from a checkout)"}
    missing = _missing("pytest", "hypothesis")
    if missing:
        return {"status": f"skipped: {', '.join(missing)} not installed (pip install -e '.[test]')"}
    code, text = _tee([sys.executable, "-m", "pytest", "-x", "-q"], out / "tests.log", root, env)
    status = "passed" if code == 0 else f"FAILED (exit status {code})"
    return {"status": status, "counts": _test_counts(text), "code": code}


def _test_counts(log: str) -> dict:
    """{"passed": n, "failed": n, ...} from the last lines of a pytest log."""
    tail = "\n".join(log.strip().splitlines()[-3:])
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", tail)}


def earlier(out: Path, name: str) -> dict | None:
    """What the log of a step skipped now says, from an earlier run into the same folder."""
    log = out / {"tests": "tests.log", "aot": "aot.txt"}[name]
    if not log.exists():
        return None
    text = log.read_text()
    return {"status": f"not run now; {log.name} of an earlier run" + (f": {_aot_line(text)}" if name == "aot" else ""),
            "counts": _test_counts(text) if name == "tests" else {}}  # fmt: skip


def run_aot(out: Path, env: dict, quick: bool) -> dict:
    if _missing("triton"):
        return {"status": "skipped: triton not installed"}
    cmd = [sys.executable, "-m", "tools.aot"] + (["--quick"] if quick else [])
    code, text = _tee(cmd, out / "aot.txt", report.REPO, env)
    return {"status": ("passed" if code == 0 else f"FAILED (exit status {code})") + f": {_aot_line(text)}",
            "code": code}  # fmt: skip


def _aot_line(log: str) -> str:
    """The summary line of a ``python -m tools.aot`` log."""
    return next((ln.strip() for ln in reversed(log.splitlines()) if "compiled in" in ln), "no summary line")


def run_bench(out: Path, args: argparse.Namespace) -> dict:

    lines: list[str] = []

    def echo(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    result = run_args(args, ["python -m tools.gpu_check"] + sys.argv[1:], echo=echo)
    (out / "bench.txt").write_text("\n".join(lines) + "\n")
    status = "passed" if result.exit_code == 0 else "FAILED: a fusedls result was wrong (see bench.txt)"
    return {"status": status, "code": result.exit_code, "results": result.results}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def summarize(results: dict) -> list[str]:
    """A markdown table per op: each fusedls row (the GPU backend) against torch eager and the copy."""
    lines = []
    for name, result in results.items():
        rows = result["rows"]
        key = result["meta"]["cols"]
        logits = {(r["mode"], r["dtype"], r["rows"], r[key]): r["bytes"] / 2 for r in rows if r["provider"] == "copy"}
        lines += [f"### {name} ({result['meta']['device']}, {result['meta']['date_utc'][:10]}, "
                  f"commit {result['meta']['git_commit'][:8]})", "",
                  f"| mode | dtype | rows | {key} | provider | ms | x torch | % copy | peak / logits | check |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if r.get("kind") != "fusedls" or r["provider"].startswith("fusedls/eager"):
                continue
            case = (r["mode"], r["dtype"], r["rows"], r[key])
            peak = r.get("peak_bytes")
            peak_text = "-" if peak is None or case not in logits else f"{peak / logits[case]:.2f}"
            ms = f"{r['median_ms']:.3f}" if "median_ms" in r else "-"
            speedup = f"{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
            lines.append(f"| {' | '.join(map(str, case))} | {r['provider']} | {ms} | {speedup} | "
                         f"{_pct(r.get('copy_fraction'))} | {peak_text} | {r['status']} |")  # fmt: skip
        lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="AOT and benchmark subsets (a few minutes)")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device-slug>/)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-aot", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args, bench_argv = p.parse_known_args(argv)

    # Checked now (argparse exits on a bad option), not after the tests have run.
    bench_argv += ["--device", "cuda"] + (["--quick"] if args.quick else [])
    bench_args = bench_parser("python -m tools.gpu_check (benchmark options)").parse_args(bench_argv)

    import torch

    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build}). "
              "Run it on a machine with an NVIDIA GPU; on this one, `python -m fusedls.bench` benchmarks the CPU and "
              "`python -m pytest` runs the tests.", file=sys.stderr)  # fmt: skip
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # before fusedls's kernels are imported: compiled, not interpreted
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    device = torch.device("cuda")
    out = Path(args.out) if args.out else report.default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    bench_args.out = str(out)
    props = torch.cuda.get_device_properties(device)
    v = report.versions()
    print(f"gpu_check: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB; torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, "
          f"python {v['python']}; results in {out}", flush=True)  # fmt: skip
    env = dict(os.environ)
    started, steps = time.perf_counter(), {}
    steps["tests"] = earlier(out, "tests") if args.skip_tests else run_tests(out, env)
    steps["aot"] = earlier(out, "aot") if args.skip_aot else run_aot(out, env, args.quick)
    steps = {name: step for name, step in steps.items() if step}
    if not args.skip_bench:
        steps["bench"] = run_bench(out, bench_args)
    commit, dirty = report.git_commit()
    summary = [f"# gpu_check on {props.name}", "",
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit[:12]}"
               f"{' + uncommitted changes' if dirty else ''}, torch {v['torch']}, triton {v['triton']}, "
               f"{time.perf_counter() - started:.0f} s", ""]  # fmt: skip
    for name, step in steps.items():
        counts = ", ".join(f"{n} {w}" for w, n in step.get("counts", {}).items())
        summary.append(f"- {name}: {step['status']}" + (f" ({counts})" if counts else ""))
    if "bench" in steps:
        summary += ["", f"Goals: {GOALS}.", ""] + summarize(steps["bench"]["results"])
    text = "\n".join(summary) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    return 1 if any(step.get("code") for step in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
