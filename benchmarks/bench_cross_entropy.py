"""Benchmark fusedls.cross_entropy against torch.nn.CrossEntropyLoss (label smoothing 0.1).

    PYTHONPATH=. TRITON_DEFAULT_FP_FUSION=1 python benchmarks/bench_cross_entropy.py [--quick]
        [--mode fwd|bwd|fwd+bwd] [--device cpu|cuda] [--dtype bf16 fp16 fp32]
        [--rows 4096 ...] [--vocab 32000 ...] [--budget SECONDS] [--threads N] [--out results.json|.csv]

Every case (rows x vocab x dtype) runs each provider: torch eager, and fusedls on each backend
that can run on the device, with and without ``inplace_backward``; reduction "mean", ~1 % of
targets ignored (-100). Before timing, each provider's loss and gradient are compared with
torch in float64 on the same (rounded) input; a fusedls mismatch makes the exit code 1.
On CPU the triton backend runs only under TRITON_INTERPRET=1 (the interpreter is no speed
measurement: use tiny --rows/--vocab to exercise the path). On a CPU shared with other work,
--threads 1 avoids the eager backend's many small multi-threaded ops stalling on descheduled
threads. Structure: SWEEPS (cases) x PROVIDERS -> run_case (check, peak_extra_bytes, measure)
-> report / write.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the checkout this file belongs to
import fusedls  # noqa: E402
from fusedls.testing import tolerance  # noqa: E402

SMOOTHING, IGNORE_FRACTION = 0.1, 0.01
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEPS = {  # (device, quick) -> (rows, vocab sizes, dtypes)
    ("cuda", False): ([4096, 16384], [32000, 50257, 128256, 152064, 256000], ["bf16"]),
    ("cuda", True): ([4096], [32000, 128256], ["bf16"]),
    ("cpu", False): ([256, 2048], [32000, 50257], ["fp32", "bf16"]),
    ("cpu", True): ([256], [32000], ["fp32", "bf16"]),
}
# Least traffic of each mode in units of R*V*s (s = bytes per element): the README's byte model.
BYTES_PER_ELEMENT = {"fwd": 1, "fwd+bwd": 2, "bwd": 1}
BYTE_MODEL = "fwd: read R*V*s; fwd+bwd: read + write R*V*s; bwd: write R*V*s; copy: read + write R*V*s"


Case = collections.namedtuple("Case", "rows vocab dtype")  # dtype: a key of DTYPES


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    backend: str | None  # None: torch.nn.CrossEntropyLoss itself
    inplace: bool = False

    def unavailable(self, device: torch.device, mode: str) -> str:
        """Why this provider does not run here ("" when it does)."""
        if self.inplace and mode == "fwd":
            return "inplace_backward only acts when a gradient is computed"
        if self.backend == "triton":
            info = {b.name: b for b in fusedls.backends()}["triton"]
            if not info.available:
                return info.reason
            if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                return "CPU tensors need TRITON_INTERPRET=1 (the interpreter is no speed measurement)"
        return ""

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return TORCH_LOSS(x, target)
        with fusedls.use_backend(self.backend):
            return fusedls.cross_entropy(x, target, label_smoothing=SMOOTHING, inplace_backward=self.inplace)


TORCH_LOSS = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTHING)
PROVIDERS = [Provider("torch", None)] + [
    Provider(f"fusedls/{b}{'+inplace' if inplace else ''}", b, inplace)
    for b in ("triton", "eager")
    for inplace in (False, True)
]

# ------------------------------------------------------------------------------------ timing


# lo/hi: 20/80 % quantiles on CUDA, 25/75 % on CPU; n samples (None: do_bench does not say).
Timing = collections.namedtuple("Timing", "median_ms lo_ms hi_ms n")


def _quantiles(times_s: list[float], lo: float, hi: float) -> Timing:
    q = statistics.quantiles(times_s, n=100, method="inclusive") if len(times_s) > 1 else times_s * 99
    ms = [1e3 * v for v in (statistics.median(times_s), q[round(lo * 100) - 1], q[round(hi * 100) - 1])]
    return Timing(*ms, len(times_s))


def measure(fn, setup, device: torch.device, budget_s: float, warm_s: float | None = None) -> Timing:
    """Time ``fn()``; ``setup()`` (or None) runs before each call, outside the timed region.

    No setup: triton's do_bench on CUDA, torch's Timer.blocked_autorange on CPU. With setup
    (fwd+bwd, bwd: each call needs the logits restored, since inplace_backward overwrites them,
    or a fresh graph) neither has a per-call untimed hook; a pool of copies does not fit on the
    GPU for large cases, and timing clone + op minus a separately timed clone adds the clone's
    noise and leaves part of it in cache. So do_bench's loop runs here with the setup first: on
    CUDA it is queued before the L2 flush and the start event, so none of its GPU time counts;
    on CPU it runs before perf_counter starts. Every provider gets the same setup. Runs about
    budget_s (setup included), >= min_reps calls, after a warm-up call unless warm_s is given.
    """
    cuda = device.type == "cuda"
    min_reps = 5 if cuda else 3  # CPU calls take up to a second: keep the default sweep short
    if setup is None and cuda:
        try:
            from triton.testing import do_bench
        except ImportError:  # CUDA events below
            pass
        else:
            return Timing(*do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1e3)), quantiles=[0.5, 0.2, 0.8]), None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prepare = setup or (lambda: None)
    if warm_s is None:  # one warm-up call, which also sizes the run
        start = time.perf_counter()
        prepare(), sync(), fn(), sync()
        warm_s = time.perf_counter() - start
    reps = int(min(1000, max(min_reps, budget_s / max(warm_s, 1e-6))))
    if setup is None and not cuda:  # Timer defaults to 1 thread: give it as many as the loop below has
        timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return _quantiles(timer.blocked_autorange(min_run_time=max(budget_s, min_reps * warm_s)).times, 0.25, 0.75)
    if not cuda:
        times = []
        for _ in range(reps):
            prepare()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return _quantiles(times, 0.25, 0.75)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # as do_bench: 256 MB > L2
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        prepare()
        flush.zero_()
        begin.record()
        fn()
        end.record()
    sync()
    return _quantiles([begin.elapsed_time(end) / 1e3 for begin, end in events], 0.2, 0.8)


# ------------------------------------------------------------------------------------ memory


def _rss_bytes() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


@functools.lru_cache(maxsize=None)
def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA max_memory_allocated() during the call minus memory_allocated() before it"
    try:
        _reset_rss_peak(), _rss_bytes(), ctypes.CDLL(None).malloc_trim
    except (OSError, KeyError, ValueError, AttributeError):
        return ""  # not measured
    return "CPU: resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) minus RSS before (approx.)"


def peak_extra_bytes(fn, setup, device: torch.device) -> int | None:
    """Peak memory one call adds to what is allocated before it (inputs pre-allocated)."""
    if setup:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # torch's CPU allocations are invisible to tracemalloc; the process RSS sees them, once the
    # heap pages freed earlier are handed back to the OS (malloc_trim) before the call.
    if not memory_method(device):
        return None
    ctypes.CDLL(None).malloc_trim(0)
    _reset_rss_peak()
    before, _ = _rss_bytes()
    fn()
    return _rss_bytes()[1] - before


# ------------------------------------------------------------------------------- correctness


def reference(x0: torch.Tensor, target: torch.Tensor, max_rows: int = 128, chunk: int = 256):
    """torch's float64 (loss, checked rows, their gradient) on the rounded input, in chunks to
    bound memory: the loss over every row, the gradient of <= max_rows spread-out rows + 1 ignored."""
    f = torch.nn.functional.cross_entropy
    n_valid = (target != -100).sum().double()
    with torch.no_grad():
        total = sum(
            f(x0[i : i + chunk].double(), target[i : i + chunk], reduction="sum", label_smoothing=SMOOTHING)
            for i in range(0, x0.shape[0], chunk)
        )
    rows = torch.linspace(0, x0.shape[0] - 1, min(max_rows, x0.shape[0]), device=x0.device).long()
    rows = torch.cat([rows, (target == -100).nonzero().flatten()[:1]]).unique()
    xs = x0[rows].double().requires_grad_()
    f(xs, target[rows], reduction="sum", label_smoothing=SMOOTHING).backward()
    return total / n_valid, rows, xs.grad / n_valid


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol |e|): <= 1 passes; NaN counts as infinitely wrong."""
    diff = (actual.detach().double() - expected).abs() / (atol + rtol * expected.abs())
    return float(diff.nan_to_num(float("inf")).max())


def check(provider, mode, x0, target, x, ref) -> float:
    """Largest error of loss and gradient as a fraction of the tolerance (also a warm-up call)."""
    ref_loss, rows, ref_grad = ref
    rtol, atol = (tolerance(x0.dtype)[k] for k in ("rtol", "atol"))  # the tests' table
    finfo = torch.finfo(x0.dtype)  # + half the subnormal step: fp16 gradients are largely subnormal
    grad_atol = atol * float(ref_grad.abs().mean()) + finfo.smallest_normal * finfo.eps / 2
    x.grad = None
    x.detach().copy_(x0)
    loss = provider.loss(x, target)
    loss.backward()
    errors = [error_ratio(loss, ref_loss, rtol, atol), error_ratio(x.grad[rows], ref_grad, rtol, grad_atol)]
    if mode == "fwd":  # the timed call: forward only, logits that do not require grad
        errors.append(error_ratio(provider.loss(x0, target), ref_loss, rtol, atol))
    x.grad = None
    return max(errors)


# ------------------------------------------------------------------------------------ runner


def workload(provider, mode, x0, target, x):
    """(setup, fn) of the timed call; setup is None when nothing needs to run before it."""
    if mode == "fwd":
        return None, lambda: provider.loss(x0, target)

    def restore():  # a fresh leaf with the original values, for every provider alike
        x.grad = None
        x.detach().copy_(x0)

    if mode == "fwd+bwd":
        return restore, lambda: provider.loss(x, target).backward()
    held = []

    def forward_first():
        restore()
        held[:] = [provider.loss(x, target)]

    return forward_first, lambda: held[0].backward()


def _failure(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg:
        return "OOM"
    return f"error: {type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"


def run_case(case: Case, providers, mode: str, device: torch.device, budget_s: float) -> list[dict]:
    nbytes = case.rows * case.vocab * DTYPES[case.dtype].itemsize
    base = {"rows": case.rows, "vocab": case.vocab, "dtype": case.dtype, "mode": mode}
    results = [dict(base, provider="copy", status="baseline", bytes=2 * nbytes)]
    results += [dict(base, provider=p.name, status="", bytes=BYTES_PER_ELEMENT[mode] * nbytes) for p in providers]
    try:
        gen = torch.Generator(device=device).manual_seed(case.rows * 1_000_003 + case.vocab)
        x0 = torch.randn(case.rows, case.vocab, generator=gen, device=device, dtype=DTYPES[case.dtype])
        target = torch.randint(0, case.vocab, (case.rows,), generator=gen, device=device)
        ignored = torch.rand(case.rows, generator=gen, device=device) < IGNORE_FRACTION
        ignored[case.rows // 2] = True  # at least one
        target[ignored] = -100
        ref = reference(x0, target)
        x = torch.empty_like(x0).requires_grad_()  # the working copy every provider starts from
        results[0]["time"] = measure(lambda: torch.empty_like(x0).copy_(x0), None, device, budget_s)
    except Exception as exc:  # the whole case cannot run
        for r in results:
            r["status"] = _failure(exc)
        return results
    for provider, result in zip(providers, results[1:]):
        reason = provider.unavailable(device, mode)
        result["status"] = reason and f"skipped: {reason}"
        setup = fn = None
        try:
            if not reason:
                result["error_ratio"] = check(provider, mode, x0, target, x, ref)
                wrong = "MISMATCH" if provider.backend else "above tol"  # torch's own error: informative
                result["status"] = "ok" if result["error_ratio"] <= 1.0 else wrong
                setup, fn = workload(provider, mode, x0, target, x)
                start = time.perf_counter()  # the memory call is also the timing's warm-up
                result["peak"] = peak_extra_bytes(fn, setup, device)
                result["time"] = measure(fn, setup, device, budget_s, warm_s=time.perf_counter() - start)
        except Exception as exc:  # keeps a MISMATCH found before the failure
            result["status"] = ("MISMATCH, then " if result["status"] == "MISMATCH" else "") + _failure(exc)
            gc.collect()  # the traceback held tensors
        x.grad = setup = fn = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    copy_s = results[0]["time"].median_ms / 1e3
    ref_row = results[1] if providers[0].backend is None else {}
    for r in results:
        t = r.pop("time", None)
        if t is not None:
            r.update(median_ms=t.median_ms, lo_ms=t.lo_ms, hi_ms=t.hi_ms, n=t.n)
            r["gb_s"] = r["bytes"] / (t.median_ms / 1e3) / 1e9
            r["copy_fraction"] = r["gb_s"] / (2 * nbytes / copy_s / 1e9)
        if t is not None and ref_row.get("median_ms") and r["provider"] != "copy":
            r["speedup_vs_torch"] = ref_row["median_ms"] / t.median_ms
            if r.get("peak") is not None and ref_row.get("peak"):
                r["memory_vs_torch"] = r["peak"] / ref_row["peak"]
    return results


# ------------------------------------------------------------------------------------ output


def _fmt(value, spec: str, empty: str = "-") -> str:
    """``value`` formatted by ``spec`` (width.precision), or ``empty`` at the same width."""
    return format(empty, f">{spec.split('.')[0].rstrip('d')}") if value is None else format(value, spec)


def report(results: list[dict], meta: dict) -> None:
    for key, value in meta.items():
        print(f"# {key:10s} {value}")
    head = f"{'rows':>6} {'V':>7} {'dtype':5} {'provider':22} {'ms':>9} {'[lo, hi] ms':>19} {'n':>4} "
    head += f"{'GB/s':>7} {'%copy':>6} {'peak MiB':>9} {'x torch':>7} {'mem/torch':>9}  check"
    print(head + "\n" + "-" * len(head))
    for r in results:
        spread = f"[{r['lo_ms']:.3f}, {r['hi_ms']:.3f}]" if "lo_ms" in r else "-"
        peak = None if r.get("peak") is None else r["peak"] / 2**20
        check = r["status"] + (f" ({r['error_ratio']:.2g} of tol)" if "error_ratio" in r else "")
        print(
            f"{r['rows']:>6} {r['vocab']:>7} {r['dtype']:5} {r['provider']:22} {_fmt(r.get('median_ms'), '9.3f')} "
            f"{spread:>19} {_fmt(r.get('n'), '4d')} {_fmt(r.get('gb_s'), '7.2f')} "
            f"{_fmt(r.get('copy_fraction') and 100 * r['copy_fraction'], '6.1f')} "
            f"{_fmt(peak, '9.1f', 'n/a' if 'error_ratio' in r else '-')} "
            f"{_fmt(r.get('speedup_vs_torch'), '7.2f')} {_fmt(r.get('memory_vs_torch'), '9.2f')}  {check}"
        )


def write(path: str, results: list[dict], meta: dict) -> None:
    """JSON {meta, results}, or CSV (PATH ending in .csv) with the metadata on every row."""
    if path.endswith(".csv"):
        keys = list(meta) + sorted({k for r in results for k in r})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({**meta, **r} for r in results)
    else:
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def metadata(device: torch.device, mode: str, load_before: float | None) -> dict:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        commit = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (git rev-parse HEAD failed)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    cuda = device.type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name(device)
    else:
        info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "cpu")
        name = f"cpu: {name or platform.processor()}, {torch.get_num_threads()} threads"
        if load_before is not None:  # other processes' load skews CPU timings
            name += f", 1-min load average {load_before:.1f} before the run, {_load():.1f} after"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": f"{mode}, label_smoothing={SMOOTHING}, reduction=mean, ~{IGNORE_FRACTION:.0%} targets ignored",
        "timing": ("triton do_bench / CUDA events, median [20 %, 80 %]" if cuda else "torch Timer / perf_counter, "
                   "median [25 %, 75 %]") + "; per-call setup (restore logits; forward for bwd) not timed",
        "byte_model": f"{BYTE_MODEL}; %copy = GB/s over the copy's GB/s in this run",
        "memory": memory_method(device) or "n/a: not measured on this device",
        "check": "loss and sampled gradient rows vs torch float64, error as a fraction of the dtype's tolerance; "
        "torch's own error may exceed it (shown, does not fail the run)",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("fwd", "bwd", "fwd+bwd"), default="fwd+bwd")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--rows", nargs="+", type=int)
    parser.add_argument("--vocab", nargs="+", type=int)
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--budget", type=float, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--out", help="write the results as JSON, or CSV when PATH ends in .csv")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, vocabs, dtypes = SWEEPS[(device.type, args.quick)]
    cases = [Case(r, v, d) for d in args.dtype or dtypes for r in args.rows or rows for v in args.vocab or vocabs]
    budget = args.budget or (0.1 if device.type == "cuda" else 0.15 if args.quick else 0.3)
    results, started, load_before = [], time.perf_counter(), _load()
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        results += run_case(case, PROVIDERS, args.mode, device, budget)
    meta = metadata(device, args.mode, load_before)
    report(results, meta)
    print(f"# wall time {time.perf_counter() - started:.1f} s")
    if args.out:
        write(args.out, results, meta)
    fusedls_rows = [r for r in results if r["provider"].startswith("fusedls")]
    return 1 if any(r["status"].startswith(("MISMATCH", "error")) for r in fusedls_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
