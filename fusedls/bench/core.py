"""What every op's benchmark shares: cases, providers, timing, memory, and running one case.

An op (``fusedls/bench/<op>.py``) subclasses :class:`OpBench`: its sweeps (lists of
:class:`Slice`), its byte model, its providers, how to make a case's inputs and float64
reference, how to check a provider's result and what call is timed. :func:`run_case` does the
rest, the same way for every op: for each provider, a correctness check (which is also the
warm-up, compilation included), one call whose peak memory is measured, then the timing.

Nothing here queries a GPU at import time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils.benchmark

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.2, 0.8)  # the spread reported with every median


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration; ``cols`` is the op's second axis (V for cross-entropy)."""

    mode: str
    dtype: str  # a key of DTYPES
    rows: int
    cols: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cartesian product of cases; a sweep is a list of slices (not one huge product)."""

    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def expand(slices: list[Slice], modes=None, dtypes=None, rows=None, cols=None) -> list[Case]:
    """The cases of ``slices``, each axis given here replacing that axis in every slice."""
    cases: dict[Case, None] = {}
    for s in slices:
        for mode in modes or s.modes:
            for dtype in dtypes or s.dtypes:
                for r in rows or s.rows:
                    for c in cols or s.cols:
                        cases[Case(mode, dtype, r, c)] = None
    return list(cases)


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation under test.

    ``build()`` returns the callable for one case (a fresh one per case, so a compiled provider
    compiles for that case's shape on its first, untimed call); ``why_not(case, device)`` says
    why it cannot run there ("" when it can). ``mutates_input``: it overwrites its input (the
    gradient written into the logits), so each timed call gets a freshly restored copy.
    """

    name: str
    kind: str  # "fusedls" (a wrong result fails the run), "torch", "compile", "external"
    build: Callable[[], Callable]
    why_not: Callable[[Case, torch.device], str] = lambda case, device: ""
    mutates_input: bool = False


class OpBench:
    """Base class of an op's benchmark; see the module docstring and ``cross_entropy.py``."""

    name = ""
    cols_key = "cols"  # the name of Case.cols in the rows written (e.g. "vocab")
    cols_label = "cols"  # its short label in tables and plots (e.g. "V")
    byte_model = ""  # the least traffic of each mode, in words
    workload = ""  # what one timed call does, in words
    check_method = ""  # what check() compares, in words
    sweeps: dict[str, list[Slice]] = {}  # keys: "cuda", "cuda-quick", "cpu", "cpu-quick"
    chart = "lines"  # <op>.png: time and memory against cols ("lines"), or one bar per provider ("bars")
    timing = ""  # how an op measured its own way (OpBench.run) times a call; "" for the usual method
    memory = ""  # likewise for peak memory

    def bytes(self, case: Case) -> int:
        """Least bytes the op must move in ``case.mode`` (the byte model)."""
        raise NotImplementedError

    def copy_bytes(self, case: Case) -> int:
        """Bytes of the copy baseline (read + write of the op's main tensor)."""
        return 2 * case.numel * case.torch_dtype.itemsize

    def providers(self) -> list[Provider]:
        raise NotImplementedError

    def prepare(self, case: Case, device: torch.device) -> Any:
        """The case's inputs and reference (anything ``check`` and ``timed_call`` understand)."""
        raise NotImplementedError

    def copy_source(self, data: Any) -> torch.Tensor:
        raise NotImplementedError

    def check(self, fn: Callable, provider: Provider, case: Case, data: Any) -> float:
        """Largest error of the provider's result as a fraction of the tolerance (<= 1 passes)."""
        raise NotImplementedError

    def timed_call(self, fn: Callable, provider: Provider, case: Case, data: Any):
        """(setup, call): ``setup`` (or None) runs untimed before every timed ``call``."""
        raise NotImplementedError

    def run(self, case: Case, providers: list[Provider], device: torch.device, budget_s: float,
            on_provider: Callable[[str], None] = lambda name: None) -> list[dict]:  # fmt: skip
        """The rows of ``case``: :func:`run_case` (an op measured another way overrides this)."""
        return run_case(self, case, providers, device, budget_s, on_provider)

    def extras(self, provider: Provider, case: Case, data: Any) -> dict:
        """Fields added to the provider's row after its check (e.g. a loss curve); none by default."""
        return {}

    def extra_files(self, out: Path, meta: dict, rows: list[dict], plot: bool) -> list[Path]:
        """Files the op writes beside ``<op>.json`` once its sweep is done; none by default."""
        return []


# ------------------------------------------------------------------------------------ timing


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    lo_ms: float  # QUANTILES[0]
    hi_ms: float  # QUANTILES[1]
    n: int


def backend_why_not(op: str, backend: str, case: "Case", device: torch.device) -> str:
    """Why the fusedls provider of ``backend`` cannot time ``case`` of ``op`` here ("" when it
    can): fusedls's own reason when the backend is refused, or the backend it would run on."""
    import fusedls
    from fusedls.backend import registry

    try:
        with fusedls.use_backend(backend):
            resolved = registry.resolve(device, case.torch_dtype, op)
    except ValueError as exc:  # e.g. "CPU tensors need TRITON_INTERPRET=1 ..."
        return str(exc)
    return "" if resolved == backend else f"{case.dtype} on {device.type} runs on the {resolved} backend"


def summarize(times_ms: list[float]) -> Timing:
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], 1)
    cuts = statistics.quantiles(times_ms, n=100, method="inclusive")
    lo, hi = (cuts[round(q * 100) - 1] for q in QUANTILES)
    return Timing(statistics.median(times_ms), lo, hi, len(times_ms))


def timing_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("triton.testing.do_bench (L2 flushed before each call); calls that need an untimed setup "
                "(restoring the logits, the forward of bwd): do_bench's loop with CUDA events, setup queued "
                "before the flush and the start event")
    return ("torch.utils.benchmark.Timer.blocked_autorange (times are per-block means); calls that need an "
            "untimed setup: time.perf_counter around each call, setup outside")


def measure(fn: Callable, setup: Callable | None, device: torch.device, budget_s: float, warm_s: float) -> Timing:
    """Time ``fn()`` for about ``budget_s``; ``setup()`` (or None) runs untimed before each call.

    ``warm_s``: how long one (already warmed-up) call with its setup took, which sizes the loop.
    Every provider of a case gets the same setup, so none is favoured.
    """
    cuda = device.type == "cuda"
    min_reps = 10 if cuda else 3  # CPU calls can take a second: keep the sweeps short
    if setup is None and cuda:
        from triton.testing import do_bench

        return summarize(do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1e3)), return_mode="all"))
    if setup is None:  # Timer defaults to one thread: give it the threads the rest of the run has
        timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        measurement = timer.blocked_autorange(min_run_time=max(budget_s, min_reps * warm_s))
        return summarize([1e3 * t for t in measurement.times])
    reps = int(min(1000, max(min_reps, budget_s / max(warm_s, 1e-6))))
    if not cuda:
        times = []
        for _ in range(reps):
            setup()
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return summarize(times)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # as do_bench: 256 MB > L2
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        setup()
        flush.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([begin.elapsed_time(end) for begin, end in events])


# ------------------------------------------------------------------------------------ memory


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


@functools.lru_cache(maxsize=None)
def memory_method(device_type: str) -> str:
    """What the peak-memory figure is on this device ("" when it cannot be measured)."""
    if device_type == "cuda":
        return "torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it"
    try:
        _reset_rss_peak(), _rss_bytes(), ctypes.CDLL(None).malloc_trim
    except (OSError, KeyError, ValueError, AttributeError):
        return ""
    return ("CPU, approximate: the process's resident-set high-water mark during the call (VmHWM, reset "
            "through /proc/self/clear_refs after malloc_trim) minus its resident set before it")


def peak_extra_bytes(fn: Callable, setup: Callable | None, device: torch.device) -> int | None:
    """Peak memory one call adds to what is allocated before it (inputs allocated beforehand)."""
    if setup is not None:
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
    if not memory_method("cpu"):
        return None
    ctypes.CDLL(None).malloc_trim(0)
    _reset_rss_peak()
    before, _ = _rss_bytes()
    fn()
    return _rss_bytes()[1] - before


# -------------------------------------------------------------------------------- one case


def failure(exc: BaseException) -> str:
    """The status of a case or provider that raised ``exc``."""
    msg = str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg:
        return "OOM"
    return f"error: {type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"[:200]


def wrong(row: dict) -> bool:
    """A fusedls result that fails the run: out of tolerance, or an error other than OOM."""
    return row.get("kind") == "fusedls" and row["status"].startswith(("MISMATCH", "error"))


def _run_provider(op: OpBench, provider: Provider, case: Case, data, device, budget_s: float, row: dict) -> None:
    reason = provider.why_not(case, device)
    if reason:
        row["status"] = f"skipped: {reason}"
        return
    try:
        fn = provider.build()
        row["error_ratio"] = op.check(fn, provider, case, data)  # also the warm-up (and compilation)
        ok = row["error_ratio"] <= 1.0
        row["status"] = "ok" if ok else "MISMATCH" if provider.kind == "fusedls" else "above tol"
        row.update(op.extras(provider, case, data))
        setup, call = op.timed_call(fn, provider, case, data)
        start = time.perf_counter()  # the memory call is also the timing's last warm-up
        row["peak_bytes"] = peak_extra_bytes(call, setup, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timing = measure(call, setup, device, budget_s, warm_s=time.perf_counter() - start)
        row.update(dataclasses.asdict(timing))
    except Exception as exc:  # keeps a MISMATCH found before the failure
        row["status"] = ("MISMATCH, then " if row["status"] == "MISMATCH" else "") + failure(exc)
        gc.collect()  # the traceback held tensors


def run_case(op: OpBench, case: Case, providers: list[Provider], device: torch.device, budget_s: float,
             on_provider: Callable[[str], None] = lambda name: None) -> list[dict]:
    """Rows for ``case``: the copy baseline, then one per provider, each with a status."""
    base = {"op": op.name, "mode": case.mode, "dtype": case.dtype, "rows": case.rows, op.cols_key: case.cols}
    rows = [dict(base, provider="copy", kind="baseline", status="", bytes=op.copy_bytes(case))]
    rows += [dict(base, provider=p.name, kind=p.kind, status="", bytes=op.bytes(case)) for p in providers]
    try:
        on_provider("inputs")
        data = op.prepare(case, device)
        src = op.copy_source(data)
        dst = torch.empty_like(src)
        rows[0].update(dataclasses.asdict(measure(lambda: dst.copy_(src), None, device, budget_s, 0.0)))
        rows[0]["status"] = "baseline"
        del dst
    except Exception as exc:  # the whole case cannot run
        for row in rows:
            row["status"] = failure(exc)
        return rows
    for provider, row in zip(providers, rows[1:]):
        on_provider(provider.name)
        _run_provider(op, provider, case, data, device, budget_s, row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del data
    derive(rows)
    return rows


def derive(rows: list[dict]) -> None:
    """Effective GB/s, fraction of the copy's GB/s, speed-up and memory against torch eager (or
    against the provider a row names as its ``reference``)."""
    copy = next((r for r in rows if r["provider"] == "copy" and "median_ms" in r), None)
    timed = {r["provider"]: r for r in rows if "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        torch_row = timed.get(r.get("reference", "torch"))
        r["gb_s"] = r["bytes"] / r["median_ms"] / 1e6
        if copy:
            r["copy_gb_s"] = copy["bytes"] / copy["median_ms"] / 1e6
            r["copy_fraction"] = r["gb_s"] / r["copy_gb_s"]
        if torch_row and r["provider"] != "copy":
            r["speedup_vs_torch"] = torch_row["median_ms"] / r["median_ms"]
            if r.get("peak_bytes") is not None and torch_row.get("peak_bytes"):
                r["memory_vs_torch"] = r["peak_bytes"] / torch_row["peak_bytes"]
