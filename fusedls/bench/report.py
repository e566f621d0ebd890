"""Output of a benchmark run: metadata, device slug, progress, table, JSON/CSV files and plots."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import fusedls

from .core import OpBench, memory_method, timing_method

REPO = Path(fusedls.__file__).resolve().parents[1]  # the checkout, when fusedls runs from one


# ---------------------------------------------------------------------------------- metadata


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "") or (
        platform.processor() or platform.machine() or "unknown"
    )


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``: the folder under benchmarks/results/."""
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def default_out(device: torch.device) -> Path:
    """benchmarks/results/<slug>/ in this checkout, or under the current directory."""
    root = REPO if (REPO / "benchmarks").is_dir() and (REPO / "pyproject.toml").exists() else Path.cwd()
    return root / "benchmarks" / "results" / device_slug(device)


def git_commit() -> tuple[str, bool | None]:
    """(HEAD of the checkout fusedls runs from, whether it has uncommitted changes) or 'unknown'."""
    try:
        run = dict(cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "fusedls": fusedls.__version__}
    for name in ("triton", "liger_kernel"):
        try:
            found[name] = __import__(name).__version__
        except Exception:
            found[name] = "not installed"
    found["cuda"] = torch.version.cuda or "none"
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class OtherCpuUse:
    """The share of the machine's CPU time that processes outside this one's tree took since
    construction (Linux /proc; None elsewhere): other work skews CPU timings."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            ticks = os.sysconf("SC_CLK_TCK")
            busy = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
            busy_s = (sum(busy) - busy[3] - busy[4]) / ticks  # all but idle and iowait
            stats = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:  # after "(comm)": state ppid ... utime stime cutime cstime (fields 14-17)
                        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    stats[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
            tree = {os.getpid()}
            for _ in range(8):  # descendants (compile workers, ...), a few generations deep
                tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
            cpu = sum(stats[pid][1] for pid in tree if pid in stats) / ticks
            return time.monotonic(), busy_s, cpu
        except (OSError, ValueError, IndexError):
            return None

    def share(self) -> float | None:
        now = self._sample()
        if self.start is None or now is None or now[0] <= self.start[0]:
            return None
        others = (now[1] - self.start[1]) - (now[2] - self.start[2])
        return max(0.0, others / ((now[0] - self.start[0]) * (os.cpu_count() or 1)))


def metadata(op: OpBench, device: torch.device, command: list[str], rows: list[dict],
             cpu_use: OtherCpuUse | None = None) -> dict:  # fmt: skip
    copies = sorted(r["copy_gb_s"] for r in rows if r["provider"] == "copy" and "copy_gb_s" in r)
    commit, dirty = git_commit()
    meta = {
        "op": op.name,
        "cols": op.cols_key,  # the name of the op's second axis in the rows
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": versions(),
        "date_utc": now(),
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(command),
        "copy_bandwidth_gb_s": {"median": copies[len(copies) // 2], "max": copies[-1]} if copies else None,
        "workload": op.workload,
        "byte_model": op.byte_model,
        "timing": (op.timing or timing_method(device)) + "; median and 20/80 % quantiles",
        "memory": op.memory or memory_method(device.type) or "not measured on this device",
        "check": op.check_method + "; a fusedls result beyond it (or a fusedls error other than out of "
        "memory) fails the run, other providers' is shown as 'above tol'",
    }
    share = cpu_use.share() if cpu_use is not None and device.type == "cpu" else None
    if share is not None:
        meta["other_processes_cpu_share"] = round(share, 3)
    return meta


# ---------------------------------------------------------------------------------- progress


class Progress:
    """On a terminal: tqdm when it is importable, else one self-rewriting line on stderr.
    Otherwise (a log file): one line per case."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.case = total, 0, enabled, ""
        self.tty, self.bar = sys.stderr.isatty(), None
        if enabled and self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)

    def start_case(self, label: str) -> None:
        self.case = label
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled and not self.tty:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)
        self.step("")

    def step(self, provider: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(provider)
        elif self.enabled and self.tty:
            pct = 100 * self.done // max(self.total, 1)
            line = f"[{self.done + 1}/{self.total}] {pct:3d}% {self.case} {provider}"
            print(f"\r{line[:119]:<119}", end="", file=sys.stderr, flush=True)

    def end_case(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            print("\r" + " " * 119 + "\r", end="", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- table


def _fmt(value, spec: str, empty: str = "-") -> str:
    """``value`` formatted by ``spec``, or ``empty`` right-aligned at the same width."""
    width = spec.split(".")[0].rstrip("df")
    return format(empty, f">{width}") if value is None else format(value, spec)


def format_table(op: OpBench, rows: list[dict]) -> str:
    key = op.cols_key
    head = (f"{'mode':7} {'dtype':5} {'rows':>6} {op.cols_label:>7} {'provider':22} {'ms':>9} {'[p20, p80] ms':>19} "
            f"{'GB/s':>7} {'%copy':>6} {'peak MiB':>9} {'x torch':>7} {'mem/torch':>9}  check")  # fmt: skip
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        case = (r["mode"], r["dtype"], r["rows"], r[key])
        if previous is not None and case != previous:
            lines.append("")
        previous = case
        spread = f"[{r['lo_ms']:.3f}, {r['hi_ms']:.3f}]" if "lo_ms" in r else "-"
        peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
        fraction = r.get("copy_fraction")
        check = r["status"] + (f" ({r['error_ratio']:.2g} of tol)" if "error_ratio" in r else "")
        lines.append(
            f"{r['mode']:7} {r['dtype']:5} {r['rows']:>6} {r[key]:>7} {r['provider']:22} "
            f"{_fmt(r.get('median_ms'), '9.3f')} {spread:>19} {_fmt(r.get('gb_s'), '7.2f')} "
            f"{_fmt(None if fraction is None else 100 * fraction, '6.1f')} {_fmt(peak, '9.1f')} "
            f"{_fmt(r.get('speedup_vs_torch'), '7.2f')} {_fmt(r.get('memory_vs_torch'), '9.2f')}  {check}"
        )
    return "\n".join(lines)


def format_meta(meta: dict) -> str:
    v = meta["versions"]
    commit = meta["git_commit"][:12] + ("+uncommitted changes" if meta["git_dirty"] else "")
    copy = meta["copy_bandwidth_gb_s"]
    lines = [
        f"# {meta['op']} on {meta['device']}"
        + (f" ({meta['threads']} threads)" if meta["threads"] else ""),
        f"# {meta['date_utc']}  commit {commit}  python {v['python']}  torch {v['torch']}  triton {v['triton']}",
        f"# workload: {meta['workload']}",
        f"# bytes: {meta['byte_model']}",
        f"# copy bandwidth in this run: median {copy['median']:.1f} GB/s" if copy else "# copy bandwidth: not measured",
        f"# time: {meta['timing']}",
        f"# memory: {meta['memory']}",
        f"# check: {meta['check']}",
    ]
    share = meta.get("other_processes_cpu_share")
    if share is not None:
        lines.append(f"# other processes used {100 * share:.0f} % of the machine's CPU time during the run"
                     + (": CPU timings are unreliable (multi-threaded ops stall on descheduled threads; "
                        "--threads 1 is steadier)" if share > 0.1 else ""))  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- files


def load(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of an earlier run's JSON (for --merge), or ({}, []) if there is none."""
    try:
        saved = json.loads(path.read_text())
        return saved["meta"], saved["rows"]
    except (OSError, ValueError, KeyError):
        return {}, []


def write_files(out: Path, op: OpBench, meta: dict, rows: list[dict]) -> list[Path]:
    """``<op>.json`` ({meta, rows}) and ``<op>.csv`` (one line per row, key metadata repeated)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{op.name}.json", out / f"{op.name}.csv"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    repeated = {k: meta[k] for k in ("device", "date_utc", "git_commit")}
    keys = list(repeated) + list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({**repeated, **r} for r in rows)
    return [json_path, csv_path]


def plot(out: Path, op: OpBench, meta: dict, rows: list[dict]) -> Path | None:
    """``<op>.png``: time and peak memory against the op's second axis, one panel pair per
    (mode, dtype, rows), one line per provider. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if op.chart == "bars":
        return _bars(out, op, meta, rows, plt)
    key = op.cols_key
    groups = list(dict.fromkeys((r["mode"], r["dtype"], r["rows"]) for r in rows))
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.6 * len(groups) + 0.4), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for (mode, dtype, n_rows), (ax_t, ax_m) in zip(groups, axes):
        members = [r for r in rows if (r["mode"], r["dtype"], r["rows"]) == (mode, dtype, n_rows)]
        for name in dict.fromkeys(r["provider"] for r in members):
            points = sorted((r[key], r) for r in members if r["provider"] == name and "median_ms" in r)
            if not points:
                continue
            xs = [x for x, _ in points]
            style = dict(linestyle="--", color="grey") if name == "copy" else dict(marker="o")
            ax_t.plot(xs, [r["median_ms"] for _, r in points], label=name, **style)
            mem = [(x, r["peak_bytes"] / 2**20) for x, r in points if r.get("peak_bytes") is not None]
            if mem and name != "copy":
                ax_m.plot([x for x, _ in mem], [m for _, m in mem], label=name, **style)
        for ax, what in ((ax_t, "time [ms] (median)"), (ax_m, "peak extra memory [MiB]")):
            ax.set_title(f"{op.name} {mode} {dtype}, rows={n_rows}", fontsize=9)
            ax.set_xlabel(op.cols_label)
            ax.set_ylabel(what)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, torch {meta['versions']['torch']}, {meta['date_utc'][:10]}, "
                 f"commit {meta['git_commit'][:8]}", fontsize=10)  # fmt: skip
    path = out / f"{op.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(out: Path, op: OpBench, meta: dict, rows: list[dict], plt) -> Path | None:
    """``<op>.png`` of an op measured one value per provider: a horizontal bar per provider and
    dtype, time of a call, with each row's speed against its reference written beside it."""
    timed = [r for r in rows if "median_ms" in r]
    if not timed:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(timed) + 1.2), constrained_layout=True)
    labels = [f"{r['provider']} ({r['dtype']})" for r in timed]
    times = [1e3 * r["median_ms"] for r in timed]
    colors = ["tab:blue" if r["kind"] == "fusedls" else "tab:grey" for r in timed]
    ax.barh(range(len(timed)), times, color=colors)
    for i, r in enumerate(timed):
        if r["kind"] == "fusedls" and r.get("speedup_vs_torch"):
            ax.text(times[i], i, f"  {1 / r['speedup_vs_torch']:.2f}x torch's time", va="center", fontsize=7)
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time per call [us] (median of interleaved rounds)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"{op.name}: {meta['device']}, torch {meta['versions']['torch']}, {meta['date_utc'][:10]}, "
                 f"commit {meta['git_commit'][:8]}", fontsize=9)  # fmt: skip
    path = out / f"{op.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
