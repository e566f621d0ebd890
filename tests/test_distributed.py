"""fusedls.distributed against the single-process torch loss on the concatenated logits.

The module spawns one group of 2 and one of 3 gloo processes (CPU) and runs every
configuration inside them; each rank compares its loss and the gradient of its slice (and,
for the linear variant, grad hidden and its weight/bias slices) with ``F.cross_entropy`` in
float64 on the full logits, and sends back the traceback of each failure. One test per
configuration then reports what every rank found. Uneven splits include a rank with no class.
Where there is a GPU (and NCCL), a one-rank NCCL group also runs a few cases on CUDA tensors.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue as queue_module
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedls
from fusedls.backend import registry
from fusedls.testing import assert_close

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)

TIMEOUT_S = 480  # a whole group's run on a busy machine; a collective waits at most 60 s before failing


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    splits: tuple[int, ...]  # classes per rank, in rank order
    kind: str = "ce"  # "ce", "linear" or "error"
    rows: tuple[int, ...] = (13,)  # target shape
    dtype: torch.dtype = torch.float64
    weight: str | None = None  # None, "full" (C,) or "local" (C_local,)
    ignored: float = 0.2  # fraction of rows set to ignore_index
    explicit_partition: bool = False  # pass vocab_start / vocab_size
    bias: bool = True  # linear only
    reduce_grad_hidden: bool = True  # linear only
    prob: bool = False  # probability targets (each rank its slice), requiring grad
    device: str = "cpu"  # "cuda": one rank on NCCL, only where there is a GPU
    backend: str = "auto"  # "triton": the local math on the Triton kernels (interpreter on CPU)
    kwargs: tuple = ()  # (name, value) pairs for the loss

    @property
    def world(self) -> int:
        return len(self.splits)

    @property
    def group(self) -> tuple[int, str]:
        """Which spawned group runs it: (world size, device)."""
        return self.world, self.device


def _cases() -> list[Case]:
    cases = []
    for splits in ((5, 6), (4, 4, 3)):
        tag = "x".join(map(str, splits))
        for reduction in ("mean", "sum", "none"):
            for weight in (None, "full", "local"):
                for eps in (0.0, 0.1):
                    kw = (("reduction", reduction), ("label_smoothing", eps))
                    cases.append(Case(f"ce-{tag}-{reduction}-w{weight}-eps{eps}", splits, weight=weight, kwargs=kw))
            extra = (("reduction", reduction), ("label_smoothing", 0.1), ("z_loss", 0.01), ("softcap", 2.0))
            cases.append(Case(f"ce-{tag}-{reduction}-zloss-softcap", splits, weight="full", kwargs=extra))
            cases.append(Case(f"ce-{tag}-{reduction}-all-ignored", splits, ignored=1.0, weight="local",
                              kwargs=(("reduction", reduction), ("label_smoothing", 0.1))))  # fmt: skip
            lin = (("reduction", reduction), ("label_smoothing", 0.1))
            cases.append(Case(f"linear-{tag}-{reduction}", splits, kind="linear", rows=(3, 5), weight="full", kwargs=lin))
    cases += [
        # ignore_index a real class owned by rank 0, then by rank 1
        Case("ce-ignore-class-0", (5, 6), kwargs=(("ignore_index", 0), ("label_smoothing", 0.1))),
        Case("ce-ignore-class-7", (5, 6), weight="full", kwargs=(("ignore_index", 7), ("reduction", "sum"))),
        Case("ce-3d-rows-explicit-partition", (5, 6), rows=(3, 5), explicit_partition=True, weight="full",
             kwargs=(("label_smoothing", 0.3),)),  # fmt: skip
        Case("ce-unbatched", (5, 6), rows=(), ignored=0.0, kwargs=(("label_smoothing", 0.1),)),
        Case("ce-no-rows", (5, 6), rows=(0,), kwargs=(("reduction", "sum"),)),
        Case("ce-no-rows-mean", (5, 6), rows=(0,)),
        Case("ce-smoothing-1", (5, 6), weight="local", kwargs=(("label_smoothing", 1.0),)),
        Case("ce-zloss-only", (5, 6), kwargs=(("z_loss", 0.1), ("reduction", "none"))),
        Case("ce-softcap-only", (5, 6), weight="local", kwargs=(("softcap", 1.5),)),
        Case("ce-fp32", (5, 6), dtype=torch.float32, weight="full", kwargs=(("label_smoothing", 0.1),)),
        Case("ce-bf16", (5, 6), dtype=torch.bfloat16, weight="full", kwargs=(("label_smoothing", 0.1),)),
        Case("ce-bf16-none", (4, 4, 3), dtype=torch.bfloat16, kwargs=(("reduction", "none"), ("label_smoothing", 0.1))),
        Case("ce-empty-slice", (4, 0, 7), weight="full", kwargs=(("label_smoothing", 0.1), ("z_loss", 0.01))),
        Case("ce-empty-slice-none", (4, 0, 7), weight="local", kwargs=(("reduction", "none"),)),
        Case("linear-nobias-zloss-softcap", (5, 6), kind="linear", bias=False, weight="local",
             kwargs=(("z_loss", 0.01), ("softcap", 3.0), ("label_smoothing", 0.1))),  # fmt: skip
        Case("linear-fp32", (5, 6), kind="linear", dtype=torch.float32, kwargs=(("label_smoothing", 0.1),)),
        Case("linear-no-reduce-grad-hidden", (4, 4, 3), kind="linear", reduce_grad_hidden=False),
        Case("linear-empty-slice", (4, 0, 7), kind="linear", weight="full", explicit_partition=True,
             kwargs=(("label_smoothing", 0.1),)),  # fmt: skip
        Case("linear-all-ignored", (4, 4, 3), kind="linear", ignored=1.0, kwargs=(("label_smoothing", 0.1),)),
        Case("ce-prob-mean", (5, 6), prob=True, weight="full", kwargs=(("label_smoothing", 0.1),)),
        Case("ce-prob-sum-zloss-softcap", (4, 4, 3), prob=True, rows=(3, 5),
             kwargs=(("reduction", "sum"), ("z_loss", 0.01), ("softcap", 2.0))),  # fmt: skip
        Case("ce-prob-none-empty-slice", (4, 0, 7), prob=True, weight="local",
             kwargs=(("reduction", "none"), ("label_smoothing", 0.2))),  # fmt: skip
        Case("ce-prob-fp32", (5, 6), prob=True, dtype=torch.float32, kwargs=(("z_loss", 0.01),)),
        Case("linear-prob", (4, 4, 3), kind="linear", prob=True, weight="full",
             kwargs=(("label_smoothing", 0.1), ("z_loss", 0.01))),  # fmt: skip
        Case("errors", (5, 6), kind="error"),
        *_triton_cases(),
        # On a GPU machine: CUDA tensors on a one-rank NCCL group.
        Case("cuda-ce-bf16", (11,), device="cuda", dtype=torch.bfloat16, weight="full",
             kwargs=(("label_smoothing", 0.1),)),  # fmt: skip
        Case("cuda-ce-fp32-none-zloss-softcap", (11,), device="cuda", dtype=torch.float32,
             kwargs=(("reduction", "none"), ("z_loss", 0.01), ("softcap", 2.0))),  # fmt: skip
        Case("cuda-ce-fp64-prob", (11,), device="cuda", prob=True, weight="local"),
        Case("cuda-linear-fp32", (11,), device="cuda", kind="linear", dtype=torch.float32,
             kwargs=(("label_smoothing", 0.1),)),  # fmt: skip
        Case("compile-fullgraph", (5, 6), kind="compile", rows=(3, 5)),
    ]
    return cases


def _triton_cases() -> list[Case]:
    """Class-id cases on the triton backend, in fp32 (fp64 always runs eagerly); slices of 20
    and 24 classes sweep two or more chunks of 16 (the worker lowers the chunk), the last one
    masked."""
    cases = []
    for splits in ((20, 17), (13, 0, 24)):
        tag = "x".join(map(str, splits))
        for reduction in ("mean", "sum", "none"):
            for weight, eps in ((None, 0.0), ("full", 0.1), ("local", 0.0), (None, 0.1)):
                kw = (("reduction", reduction), ("label_smoothing", eps))
                cases.append(Case(f"triton-ce-{tag}-{reduction}-w{weight}-eps{eps}", splits, weight=weight, kwargs=kw,
                                  dtype=torch.float32, backend="triton"))  # fmt: skip
            extra = (("reduction", reduction), ("label_smoothing", 0.1), ("z_loss", 0.01), ("softcap", 2.0))
            cases.append(Case(f"triton-ce-{tag}-{reduction}-zloss-softcap", splits, weight="full", kwargs=extra,
                              dtype=torch.float32, backend="triton"))  # fmt: skip
            cases.append(Case(f"triton-linear-{tag}-{reduction}", splits, kind="linear", weight="full", kwargs=extra,
                              dtype=torch.float32, backend="triton"))  # fmt: skip
    cases += [
        Case("triton-ce-bf16", (20, 17), dtype=torch.bfloat16, weight="full", kwargs=(("label_smoothing", 0.1),),
             backend="triton"),
        Case("triton-ce-fp32-all-ignored", (20, 17), dtype=torch.float32, ignored=1.0, backend="triton"),
        Case("triton-ce-ignore-class-3", (20, 17), kwargs=(("ignore_index", 3),), dtype=torch.float32, backend="triton"),
        Case("cuda-triton-ce-bf16", (37,), device="cuda", dtype=torch.bfloat16, weight="full",
             kwargs=(("label_smoothing", 0.1), ("softcap", 3.0)), backend="triton"),
    ]  # fmt: skip
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------- the workers


def _data(case: Case, n_hidden: int = 6):
    """Full tensors, identical on every rank (seeded), in float64."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    n_cols = sum(case.splits)
    target = torch.randint(0, n_cols, case.rows, generator=g)
    if case.rows:
        ignore = dict(case.kwargs).get("ignore_index", -100)
        target[torch.rand(case.rows, generator=g) < case.ignored] = ignore
    weight = torch.rand(n_cols, generator=g, dtype=torch.float64) + 0.1
    upstream = torch.randn(case.rows, generator=g, dtype=torch.float64)
    logits = 3 * torch.randn(*case.rows, n_cols, generator=g, dtype=torch.float64)
    hidden = torch.randn(*case.rows, n_hidden, generator=g, dtype=torch.float64)
    proj = torch.randn(n_cols, n_hidden, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(n_cols, generator=g, dtype=torch.float64)
    if case.prob:
        target = torch.softmax(2 * torch.randn(*case.rows, n_cols, generator=g, dtype=torch.float64), -1)
    return target, weight, upstream, logits, hidden, proj, bias


def _reference(logits, target, weight, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
               softcap=None):  # fmt: skip
    """torch's loss on the full float64 logits, with the z-loss and soft cap written out."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    prob = target.is_floating_point()
    rows_z = z.reshape(-1, z.shape[-1])
    rows_t = target.reshape(rows_z.shape if prob else (-1,))
    out_shape = target.shape[:-1] if prob else target.shape
    kw = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss == 0.0:
        return F.cross_entropy(rows_z, rows_t, reduction=reduction, **kw).reshape(out_shape if reduction == "none" else ())
    valid = torch.ones(rows_z.shape[0], dtype=torch.bool) if prob else rows_t != ignore_index
    rows = F.cross_entropy(rows_z, rows_t, reduction="none", **kw) + z_loss * torch.logsumexp(rows_z, 1).square() * valid
    if reduction == "none":
        return rows.reshape(out_shape)
    if reduction == "sum":
        return rows.sum()
    denom = valid.sum() if weight is None or prob else (weight[rows_t.masked_fill(~valid, 0)] * valid).sum()
    return rows.sum() / denom


def _upstream(upstream, reduction):
    """The upstream gradient: random per row for "none", a scalar other than 1 otherwise."""
    return upstream if reduction == "none" else torch.tensor(0.37, dtype=torch.float64)


def _targets(case: Case, target, start, stop):
    """(the reference's target, this rank's, on the case's device): probabilities are rounded
    to the case's dtype, require grad, and each rank gets its slice of them."""
    if not case.prob:
        return target, target.to(case.device)
    rounded = target.to(case.dtype).double()
    return rounded.clone().requires_grad_(), rounded[..., start:stop].to(case.dtype).to(case.device).requires_grad_()


def _check_target_grad(case: Case, t, ref_grad_t, start, stop):
    if case.prob:
        assert_close(t.grad.cpu(), ref_grad_t[..., start:stop], case.dtype, "grad of the local probability target")


def _local_weight(case: Case, weight, start, stop):
    """The class weights as the case passes them: every class, this rank's, or none."""
    w = {"full": weight, "local": weight[start:stop]}.get(case.weight)
    return None if w is None else w.to(case.device)


def _assert_same_on_every_rank(loss):
    mine = loss.detach().double().reshape(-1)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for other in every:
        torch.testing.assert_close(other, mine, rtol=0, atol=0, equal_nan=True, msg="ranks returned different losses")


def _run_ce(case: Case, rank: int, group_kwargs: dict) -> None:
    kw = dict(case.kwargs)
    target, weight, upstream, logits, *_ = _data(case)
    start = sum(case.splits[:rank])
    stop = start + case.splits[rank]
    rounded = logits.to(case.dtype).double()  # the reference sees the same rounded values
    x_ref = rounded.clone().requires_grad_()
    t_ref, t = _targets(case, target, start, stop)
    ref = _reference(x_ref, t_ref, weight if case.weight else None, **kw)
    up = _upstream(upstream, kw.get("reduction", "mean"))
    ref_grads = torch.autograd.grad(ref, [x_ref, t_ref] if case.prob else [x_ref], up)
    x = rounded[..., start:stop].to(case.dtype).to(case.device).requires_grad_()
    w = _local_weight(case, weight, start, stop)
    loss = fusedls.distributed.vocab_parallel_cross_entropy(x, t, weight=w, **group_kwargs, **kw)
    assert loss.dtype == case.dtype and loss.shape == ref.shape, (loss.dtype, loss.shape, ref.shape)
    assert_close(loss.cpu(), ref, case.dtype, "loss")
    _assert_same_on_every_rank(loss)
    loss.backward(up.to(case.dtype).to(case.device))
    assert_close(x.grad.cpu(), ref_grads[0][..., start:stop], case.dtype, "grad of the local logits")
    _check_target_grad(case, t, ref_grads[-1], start, stop)


def _run_linear(case: Case, rank: int, group_kwargs: dict) -> None:
    kw = dict(case.kwargs)
    target, weight, upstream, _, hidden, proj, bias = _data(case)
    start = sum(case.splits[:rank])
    stop = start + case.splits[rank]
    h_ref, p_ref = hidden.clone().requires_grad_(), proj.clone().requires_grad_()
    b_ref = bias.clone().requires_grad_() if case.bias else None
    t_ref, t = _targets(case, target, start, stop)
    ref = _reference(F.linear(h_ref, p_ref, b_ref), t_ref, weight if case.weight else None, **kw)
    up = _upstream(upstream, kw.get("reduction", "mean"))
    wanted = [v for v in (h_ref, p_ref, b_ref, t_ref if case.prob else None) if v is not None]
    ref_grads = torch.autograd.grad(ref, wanted, up)
    h = hidden.to(case.dtype).to(case.device).requires_grad_()
    p = proj[start:stop].to(case.dtype).to(case.device).requires_grad_()
    b = bias[start:stop].to(case.dtype).to(case.device).requires_grad_() if case.bias else None
    w = _local_weight(case, weight, start, stop)
    loss = fusedls.distributed.vocab_parallel_linear_cross_entropy(
        h, p, t, bias=b, weight=w, reduce_grad_hidden=case.reduce_grad_hidden, **group_kwargs, **kw
    )
    assert loss.dtype == case.dtype and loss.shape == ref.shape, (loss.dtype, loss.shape, ref.shape)
    assert_close(loss.cpu(), ref, case.dtype, "loss")
    loss.backward(up.to(case.dtype).to(case.device))
    grad_h = h.grad
    if not case.reduce_grad_hidden:  # this rank's part only: the caller sums it
        dist.all_reduce(grad_h)
    assert_close(grad_h.cpu(), ref_grads[0], case.dtype, "grad hidden")
    assert_close(p.grad.cpu(), ref_grads[1][start:stop], case.dtype, "grad of the local weight rows")
    if case.bias:
        assert_close(b.grad.cpu(), ref_grads[2][start:stop], case.dtype, "grad of the local bias")
    _check_target_grad(case, t, ref_grads[-1], start, stop)


def _expect(error, match, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except error as exc:
        if match not in str(exc):
            raise AssertionError(f"{error.__name__} without {match!r}: {exc}") from exc
        return
    raise AssertionError(f"no {error.__name__} ({match!r})")


def _run_errors(case: Case, rank: int, group_kwargs: dict) -> None:
    """Every rank raises the same error at the same point, so none is left in a collective."""
    vp = fusedls.distributed.vocab_parallel_cross_entropy
    lin = fusedls.distributed.vocab_parallel_linear_cross_entropy
    n_local = case.splits[rank]
    x = torch.randn(4, n_local)
    t = torch.tensor([0, 1, 2, 3])
    _expect(ValueError, "outside [0, 11)", vp, x, torch.tensor([0, 11, 2, 3]))
    _expect(ValueError, "outside [0, 11)", vp, x, torch.tensor([0, -5, 2, 3]))
    _expect(ValueError, "target must have shape (4,)", vp, x, torch.tensor([0, 1, 2]))
    _expect(ValueError, f"probability target must have shape (4, {n_local})", vp, x, torch.rand(4, 11))
    _expect(TypeError, "local_logits must have a floating-point dtype", vp, x.long(), t)
    _expect(ValueError, "weight must have shape (11,)", vp, x, t, weight=torch.rand(3))
    _expect(TypeError, "weight must be a torch.Tensor", vp, x, t, weight=[1.0] * 11)
    _expect(ValueError, "reduction must be one of", vp, x, t, reduction="avg")
    _expect(ValueError, "label_smoothing must be in [0, 1]", vp, x, t, label_smoothing=1.5)
    _expect(ValueError, "softcap must be a finite number > 0", vp, x, t, softcap=0.0)
    _expect(ValueError, "z_loss must be a finite number >= 0", vp, x, t, z_loss=-1.0)
    _expect(ValueError, "vocab_start=", vp, x, t, vocab_start=sum(case.splits[:rank]) + 1)
    _expect(ValueError, "do not fit in vocab_size=3", vp, x, t, vocab_start=0, vocab_size=3)
    _expect(TypeError, "process_group must be a torch.distributed ProcessGroup", vp, x, t, process_group="world")
    hidden = torch.randn(4, 6)
    _expect(ValueError, "local_weight must have shape (C_local, 6)", lin, hidden, torch.randn(n_local, 5), t)
    _expect(TypeError, "local_weight must have hidden's dtype", lin, hidden, torch.randn(n_local, 6).double(), t)
    _expect(ValueError, f"bias must have shape ({n_local},)", lin, hidden, torch.randn(n_local, 6), t, bias=torch.randn(2))
    # After all these, the group still works: a valid call on every rank.
    loss = vp(x, t, **group_kwargs)
    assert torch.isfinite(loss), loss


def _run_compiled(case: Case, rank: int, group_kwargs: dict) -> None:
    """Both losses under torch.compile(fullgraph=True): the collectives and the autograd
    Functions trace into one graph (the CPU target check is skipped while compiling; the
    placement is given, its all_gather cannot be traced)."""
    target, weight, _, logits, hidden, proj, _ = _data(case)
    start = sum(case.splits[:rank])
    stop = start + case.splits[rank]
    part = fusedls.distributed.vocab_partition(case.splits[rank])  # outside the compiled code
    kw = dict(label_smoothing=0.1, z_loss=0.01, vocab_start=part.start, vocab_size=part.total)

    def losses(x, h, p):
        a = fusedls.distributed.vocab_parallel_cross_entropy(x * 2, target, weight=weight, **kw)
        b = fusedls.distributed.vocab_parallel_linear_cross_entropy(h, p, target, softcap=3.0, **kw)
        return a + b

    full = [t.clone().requires_grad_() for t in (logits, hidden, proj)]
    ref_kw = dict(label_smoothing=0.1, z_loss=0.01)
    ref = _reference(full[0] * 2, target, weight, **ref_kw)
    ref = ref + _reference(F.linear(full[1], full[2]), target, None, softcap=3.0, **ref_kw)
    ref_grads = torch.autograd.grad(ref, full)
    x, h, p = (t.clone().requires_grad_() for t in (logits[..., start:stop], hidden, proj[start:stop]))
    loss = torch.compile(losses, fullgraph=True, backend="aot_eager")(x, h, p)
    assert_close(loss, ref, torch.float64, "compiled loss")
    loss.backward()
    assert_close(x.grad, ref_grads[0][..., start:stop], torch.float64, "compiled grad of the local logits")
    assert_close(h.grad, ref_grads[1], torch.float64, "compiled grad hidden")
    assert_close(p.grad, ref_grads[2][start:stop], torch.float64, "compiled grad of the local weight rows")


_RUNNERS = {"ce": _run_ce, "linear": _run_linear, "error": _run_errors, "compile": _run_compiled}


def _load_tests_conftest() -> None:
    """Runs tests/conftest.py (the interpreter's bf16 rounding, the environment) in a worker
    process, by path: a spawned worker has no pytest to load it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_fusedls_tests_conftest", Path(__file__).with_name("conftest.py"))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _worker(rank: int, group: tuple[int, str], init_file: str, results) -> None:
    torch.set_num_threads(1)
    world, device = group
    out = {}
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        # Chunks of 8 elements: a chunk is one or two rows, so the row loop runs many times.
        import fusedls.backend.eager.vocab_parallel_cross_entropy as local

        local._CHUNK_ELEMENTS = 8
        if _triton_ready(device):  # chunks of 16 classes in the kernels
            _load_tests_conftest()  # the interpreter rounds fp32 -> bf16 as a GPU does, as in the parent
            from fusedls.backend.triton import tuning

            tuning.CROSS_ENTROPY_MAX_BLOCK = {2: 16, 4: 16}
            tuning.VOCAB_PARALLEL_CHUNK_ELEMENTS = 64  # launches of 3 or 4 rows
        for case in CASES:
            if case.group != group:
                continue
            group_kwargs = {}
            if case.explicit_partition:
                part = fusedls.distributed.vocab_partition(case.splits[rank])
                group_kwargs = dict(vocab_start=part.start, vocab_size=part.total)
            try:
                with fusedls.use_backend(case.backend):
                    resolved = registry.resolve(torch.device(case.device), case.dtype, "vocab_parallel_cross_entropy")
                    assert case.backend != "triton" or resolved == "triton", f"runs on {resolved}"
                    _RUNNERS[case.kind](case, rank, group_kwargs)
                out[case.name] = None
            except Exception:
                out[case.name] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        out["<worker>"] = traceback.format_exc()
    results.put((rank, out))


def _run_group(group: tuple[int, str], tmp_dir) -> dict:
    world, device = group
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(tmp_dir, f"init-{world}-{device}")
    procs = [ctx.Process(target=_worker, args=(rank, group, init_file, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    found = {}
    try:
        for _ in range(world):
            rank, out = results.get(timeout=TIMEOUT_S)
            found[rank] = out
    except queue_module.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return found


def _triton_ready(device: str) -> bool:
    """The triton backend runs on this device's tensors (CPU: under TRITON_INTERPRET=1)."""
    return not registry.triton_unavailable_reason(torch.device(device))


def _runnable(group: tuple[int, str]) -> bool:
    return group[1] == "cpu" or (torch.cuda.is_available() and dist.is_nccl_available())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(world size, device): {rank: {case name: traceback or None}}}, one spawn per group."""
    tmp_dir = str(tmp_path_factory.mktemp("dist"))
    return {group: _run_group(group, tmp_dir) for group in sorted({c.group for c in CASES}) if _runnable(group)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(outcomes, case):
    if not _runnable(case.group):
        pytest.skip("needs a CUDA device and NCCL")
    if case.backend == "triton" and not _triton_ready(case.device):
        pytest.skip("the triton backend cannot run here")
    found = outcomes[case.group]
    failures = []
    for rank in range(case.world):
        if rank not in found:
            failures.append(f"rank {rank}: no result (the worker crashed or hung)")
            continue
        if "<worker>" in found[rank]:
            failures.append(f"rank {rank}: worker failed:\n{found[rank]['<worker>']}")
        elif case.name not in found[rank]:
            failures.append(f"rank {rank}: case not run")
        elif found[rank][case.name] is not None:
            failures.append(f"rank {rank}:\n{found[rank][case.name]}")
    if failures:
        pytest.fail(f"{case.name} (splits {case.splits}):\n" + "\n".join(failures), pytrace=False)


# ------------------------------------------------------------------ without a process group


def test_no_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fusedls.distributed.vocab_parallel_cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fusedls.distributed.vocab_parallel_linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), t)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fusedls.distributed.vocab_partition(4)
    # metadata errors come first, without a group
    with pytest.raises(ValueError, match="target must have shape"):
        fusedls.distributed.vocab_parallel_cross_entropy(x, t[:2])
