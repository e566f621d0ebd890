"""``python -m fusedls.bench --op overhead``: the per-call cost of every op at tiny sizes.

At a few hundred elements the kernels cost nothing, so one forward + backward measures the host
path a user pays on every call, whatever the size: argument checks, backend selection, autograd,
allocations, dispatch and launches. Each fusedls op runs the path it runs at training sizes (no
hand-off to torch below some size) against torch's own op or composition, on the same inputs.

Method: every provider is warmed up and checked first; then, in ``ROUNDS`` rounds, each provider in
turn times a block of calls (a block lasts about ``BLOCK_S``), so the providers are interleaved
and drift of the machine hits them alike; a provider's time is the median over the rounds of its
per-call mean. CPU: one thread (``torch.set_num_threads(1)`` for the run), timed by the thread's
CPU time (``time.thread_time``), which other processes on a shared machine do not inflate. CUDA:
wall time, and a block ends with a synchronisation, so a call's time is its host time when the
host is the bottleneck.
Rows: ``<op>`` (fusedls) and ``<op>:torch``; ``x torch`` is the torch provider's time over
fusedls's (above 1: fusedls is faster).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fusedls
from fusedls.testing import reference_cross_entropy, tolerance

from .core import Case, OpBench, Provider, Slice, derive, summarize

ROUNDS = 15
BLOCK_S = 0.02  # seconds of calls per provider per round
ROWS, COLS, HIDDEN = 4, 64, 32  # the tiny problem: (rows, cols) activations and logits, hidden size
P = 0.1  # dropout probability
SMOOTHING = 0.1


@dataclasses.dataclass(frozen=True)
class Pair:
    """One op: its fusedls call and torch's equivalent, both ``(inputs) -> None`` doing forward
    + backward (or the whole op when it has no backward), and the check of the fusedls result."""

    name: str
    inputs: Callable[[Case, torch.device], dict]
    fusedls: Callable[[dict], object]
    torch: Callable[[dict], object]
    check: Callable[[dict, Case], float]  # largest error of fusedls's result, as a fraction of the tolerance


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _randn(case: Case, device, *shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device).to(case.torch_dtype)


def _error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    tol = tolerance(dtype)
    diff = (actual.detach().double() - expected.double()).abs() / (tol["atol"] + tol["rtol"] * expected.double().abs())
    return float(diff.nan_to_num(nan=math.inf).max())


# ------------------------------------------------------------------------------------ the ops


def _ce_inputs(case, device):
    x = _leaf(_randn(case, device, ROWS, COLS))
    return {"x": x, "t": torch.randint(0, COLS, (ROWS,), device=device)}


def _ce_check(d, case):
    loss = fusedls.cross_entropy(d["x"], d["t"], label_smoothing=SMOOTHING)
    ref, _, _ = reference_cross_entropy(d["x"], d["t"], label_smoothing=SMOOTHING)
    return _error(loss, ref, case.torch_dtype)


def _lce_inputs(case, device):
    return {"h": _leaf(_randn(case, device, ROWS, HIDDEN)), "w": _leaf(_randn(case, device, COLS, HIDDEN, seed=1)),
            "t": torch.randint(0, COLS, (ROWS,), device=device)}  # fmt: skip


def _lce_check(d, case):
    loss = fusedls.linear_cross_entropy(d["h"], d["w"], d["t"], label_smoothing=SMOOTHING)
    ref, _, _ = reference_cross_entropy(d["h"].double() @ d["w"].double().t(), d["t"], label_smoothing=SMOOTHING)
    return _error(loss, ref, case.torch_dtype)


def _act_inputs(case, device):
    return {"x": _leaf(_randn(case, device, ROWS, COLS)), "r": _leaf(_randn(case, device, ROWS, COLS, seed=1)),
            "w": _leaf(1 + 0.1 * _randn(case, device, COLS, seed=2)), "g": _randn(case, device, ROWS, COLS, seed=3)}


def _dropout_check(d, case):
    # kept elements are x / (1 - p) rounded once; dropped ones 0
    x = d["x"].detach()
    y = fusedls.dropout(x, P)
    kept = y != 0
    want = (x.float() * (1.0 / (1.0 - P))).to(x.dtype)
    return 0.0 if torch.equal(y[kept], want[kept]) else math.inf


def _rms_check(d, case):
    x, r, w = (d[k].detach() for k in ("x", "r", "w"))
    y, h = fusedls.dropout_add_rms_norm(x, r, w, 0.0)
    ref = F.rms_norm((x.double() + r.double()).to(x.dtype).double(), (COLS,), w.double(), 1e-6)
    return _error(y, ref, case.torch_dtype)


def _vnorm_check(d, case):
    return _error(fusedls.vector_norm(d["x"], dim=-1), torch.linalg.vector_norm(d["x"].double(), dim=-1),
                  case.torch_dtype)  # fmt: skip


def _params_inputs(case, device):
    shapes = [(COLS, HIDDEN), (COLS,), (HIDDEN, HIDDEN), (HIDDEN,)] * 2
    params = [_leaf(_randn(case, device, *s, seed=i)) for i, s in enumerate(shapes)]
    for i, p in enumerate(params):
        p.grad = _randn(case, device, *p.shape, seed=100 + i)
    return {"params": params}


def _norms_check(d, case):
    want = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in d["params"]]))
    return _error(fusedls.total_norm([p.grad for p in d["params"]]), want, case.torch_dtype)


def _penalty_check(d, case):
    want = sum(p.detach().double().square().sum() for p in d["params"])
    return _error(fusedls.l2_penalty(d["params"]), want, case.torch_dtype)


def _rms_torch(d):
    h = d["r"] + F.dropout(d["x"], P)
    torch.autograd.backward((F.rms_norm(h, (COLS,), d["w"], 1e-6), h), (d["g"], d["g"]))


PAIRS = [
    Pair("cross_entropy", _ce_inputs,
         lambda d: fusedls.cross_entropy(d["x"], d["t"], label_smoothing=SMOOTHING).backward(),
         lambda d: F.cross_entropy(d["x"], d["t"], label_smoothing=SMOOTHING).backward(), _ce_check),
    Pair("linear_cross_entropy", _lce_inputs,
         lambda d: fusedls.linear_cross_entropy(d["h"], d["w"], d["t"], label_smoothing=SMOOTHING).backward(),
         lambda d: F.cross_entropy(F.linear(d["h"], d["w"]), d["t"], label_smoothing=SMOOTHING).backward(),
         _lce_check),
    Pair("dropout", _act_inputs,
         lambda d: torch.autograd.backward(fusedls.dropout(d["x"], P), d["g"]),
         lambda d: torch.autograd.backward(F.dropout(d["x"], P), d["g"]), _dropout_check),
    Pair("dropout_add", _act_inputs,
         lambda d: torch.autograd.backward(fusedls.dropout_add(d["x"], d["r"], P), d["g"]),
         lambda d: torch.autograd.backward(d["r"] + F.dropout(d["x"], P), d["g"]), _dropout_check),
    Pair("dropout_add_rms_norm", _act_inputs,
         lambda d: torch.autograd.backward(fusedls.dropout_add_rms_norm(d["x"], d["r"], d["w"], P), (d["g"], d["g"])),
         _rms_torch, _rms_check),
    Pair("vector_norm", _act_inputs,
         lambda d: fusedls.vector_norm(d["x"]).backward(),
         lambda d: torch.linalg.vector_norm(d["x"]).backward(), _vnorm_check),
    Pair("clip_grad_norm_", _params_inputs,
         lambda d: fusedls.clip_grad_norm_(d["params"], 1e30),
         lambda d: torch.nn.utils.clip_grad_norm_(d["params"], 1e30, foreach=True), _norms_check),
    Pair("l2_penalty", _params_inputs,
         lambda d: fusedls.l2_penalty(d["params"]).backward(),
         lambda d: sum(p.square().sum() for p in d["params"]).backward(), _penalty_check),
]  # fmt: skip


# ----------------------------------------------------------------------------------- the bench


class OverheadBench(OpBench):
    name = "overhead"
    cols_key, cols_label = "cols", "N"
    byte_model = "not a bandwidth measurement: tiny inputs, so the time is the host path of one call"
    workload = (
        f"forward + backward of each op at tiny sizes ({ROWS} x {COLS} activations / logits, hidden {HIDDEN}, "
        f"8 small parameters with gradients; dropout p={P}, label_smoothing={SMOOTHING}) against torch's own op or "
        "composition; clip_grad_norm_ with max_norm 1e30 (nothing clipped)"
    )
    check_method = "each fusedls op's value against float64 torch (dropout: survivors exactly x/(1-p))"
    chart = "bars"
    timing = ("interleaved rounds: each provider in turn times a block of calls (~20 ms), 15 rounds; a "
              "provider's time is the median of its per-call means (CPU: one thread, the thread's CPU time; CUDA: "
              "wall time, each block ending with a synchronisation)")
    memory = "not measured (tiny inputs)"
    sweeps = {
        "cpu": [Slice(("fwd+bwd",), ("fp32",), (ROWS,), (COLS,))],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32",), (ROWS,), (COLS,))],
        "cuda": [Slice(("fwd+bwd",), ("fp32", "bf16"), (ROWS,), (COLS,))],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (ROWS,), (COLS,))],
    }

    def bytes(self, case: Case) -> int:
        return 0

    def providers(self) -> list[Provider]:
        found = []
        for pair in PAIRS:
            found.append(Provider(pair.name, "fusedls", lambda pair=pair: pair.fusedls))
            found.append(Provider(f"{pair.name}:torch", "torch", lambda pair=pair: pair.torch))
        return found

    def run(self, case: Case, providers: list[Provider], device: torch.device, budget_s: float,
            on_provider=lambda name: None) -> list[dict]:  # fmt: skip
        """One row per provider, measured in interleaved rounds (see the module docstring)."""
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._run(case, providers, device, on_provider)
        finally:
            torch.set_num_threads(threads)

    def _run(self, case, providers, device, on_provider) -> list[dict]:
        pairs = {p.name: p for p in PAIRS}
        base = {"op": self.name, "mode": case.mode, "dtype": case.dtype, "rows": case.rows, self.cols_key: case.cols}
        rows, timed = [], []
        for provider in providers:
            op_name, _, kind = provider.name.partition(":")
            pair = pairs[op_name]
            row = dict(base, provider=provider.name, kind=provider.kind, status="", bytes=0,
                       reference=f"{op_name}:torch")  # fmt: skip
            rows.append(row)
            on_provider(provider.name)
            try:
                data = pair.inputs(case, device)
                if kind != "torch":
                    row["error_ratio"] = pair.check(data, case)
                    row["status"] = "ok" if row["error_ratio"] <= 1.0 else "MISMATCH"
                else:
                    row["status"] = "ok"
                call = provider.build()
                start = time.perf_counter()
                for _ in range(3):
                    call(data)
                _sync(device)
                per_call = max((time.perf_counter() - start) / 3, 1e-7)  # sizes the blocks only
                timed.append((row, call, data, max(1, int(BLOCK_S / per_call))))
            except Exception as exc:  # a provider that cannot run keeps a status
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        clock = time.perf_counter if device.type == "cuda" else time.thread_time
        per_call = {id(row): [] for row, *_ in timed}
        for _ in range(ROUNDS):
            for row, call, data, n in timed:
                _sync(device)
                start = clock()
                for _ in range(n):
                    call(data)
                _sync(device)
                per_call[id(row)].append(1e3 * (clock() - start) / n)
        for row, *_ in timed:
            row.update(dataclasses.asdict(summarize(per_call[id(row)])))
        derive(rows)
        return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


BENCH = OverheadBench()
