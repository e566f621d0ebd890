"""foreach_norm, total_norm, clip_grad_norm_, l1/l2 penalties: against torch in float64, on both
backends (the triton one under the interpreter on CPU), with chunks of 16 elements, work items of
4 chunks (64 elements) and merge steps of 4 partials so every loop of the kernels runs several
times."""

import functools
import math
import socket

import pytest
import torch

import fusedls
from fusedls.backend import registry
from fusedls.testing import assert_close, tolerance

from conftest import AVAILABLE, DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cross_entropy import PROPERTY_SETTINGS

ORDS = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1,), (5,), (17,), (40,), (3, 7), (0,), (64,)]
CHUNK, CHUNKS = 16, 4  # the elementwise kernels' chunk and chunks per work item in these tests
ITEM = CHUNK * CHUNKS
# Tensors against work items of ITEM elements: ending exactly at an item boundary (one item, two
# items), in a later item at a chunk boundary, mid-chunk in the first / a later chunk of a later
# item, and a tensor of one element past a boundary.
ITEM_SIZES = [(ITEM,), (2 * ITEM,), (ITEM + 2 * CHUNK,), (2 * ITEM + 5,), (ITEM + 3 * CHUNK + 7,), (3, ITEM // 3 + 1),
              (ITEM + 1,)]  # fmt: skip


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if "triton" in AVAILABLE:
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "FOREACH_NORM_BLOCK", CHUNK)
        monkeypatch.setattr(tuning, "FOREACH_NORM_CHUNKS", CHUNKS)
        monkeypatch.setattr(tuning, "FOREACH_NORM_MERGE_BLOCK", 4)
    if "cpp" in AVAILABLE:
        monkeypatch.setattr("fusedls.backend.cpp.foreach_norm.BLOCK", 16)  # several work items per tensor


def _tensors(sizes, dtype, seed=0, scale=1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device) for s in sizes]


def _sizes(ord):
    return [s for s in SIZES if math.prod(s) > 0] if (ord < 0 or ord == math.inf) else SIZES


def _ref_norm(t, ord):
    return torch.linalg.vector_norm(t.double(), ord)


def _tol_sum(dtype, ord):
    # a norm of rounded inputs, computed in fp32 and rounded once; p-norms through exp2/log2
    return tolerance(torch.float32 if dtype == torch.float32 else dtype, 2 if ord not in (1, 2) else 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
def test_foreach_norm_values(backend, dtype, ord):
    ts = _tensors(_sizes(ord), dtype)
    got = fusedls.foreach_norm(ts, ord)
    assert len(got) == len(ts)
    for g, t in zip(got, ts):
        assert g.shape == () and g.dtype == dtype
        want = _ref_norm(t, ord)
        assert_close(g.float(), want.to(dtype).double(), dtype, msg=f"ord {ord}")


@pytest.mark.parametrize("ord", ORDS)
def test_total_norm_mixed_dtypes(backend, ord):
    ts = [t for d in DTYPES for t in _tensors(_sizes(ord), d, seed=1)]
    got = fusedls.total_norm(ts, ord)
    want = _ref_norm(torch.cat([t.double().flatten() for t in ts]), ord)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)
    norms = fusedls.foreach_norm(ts, ord)  # mixed dtypes keep the caller's order
    assert [n.dtype for n in norms] == [t.dtype for t in ts]
    for n, t in zip(norms, ts):
        assert_close(n, _ref_norm(t, ord).to(t.dtype).double(), t.dtype)


@pytest.mark.parametrize("ord", ORDS)
def test_work_item_boundaries(backend, ord):
    # several items per tensor, tensors ending at / inside an item, at / inside a chunk: the norms
    # (every kind), the total, and the map kernels (scaling in place, the penalties' gradients)
    for dtype in (torch.float32, torch.bfloat16):
        ts = _tensors(ITEM_SIZES, dtype, seed=7)
        for g, t in zip(fusedls.foreach_norm(ts, ord), ts):
            assert_close(g.float(), _ref_norm(t, ord).to(dtype).double(), dtype, msg=f"ord {ord} numel {t.numel()}")
        want = _ref_norm(torch.cat([t.double().flatten() for t in ts]), ord)
        assert_close(fusedls.total_norm(ts, ord).float(), want.to(dtype).double(), dtype, msg=f"ord {ord}")
    if ord != 2.0:
        return
    ts = _tensors(ITEM_SIZES, torch.float32, seed=8)
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
    for p, t in zip(params, ts):
        p.grad = t.clone()
    total = fusedls.clip_grad_norm_(params, 1.0)
    coef = 1.0 / (_ref_norm(torch.cat([t.double().flatten() for t in ts]), 2).item() + 1e-6)
    assert_close(total, torch.tensor(1.0 / coef - 1e-6, dtype=torch.float64), torch.float32)
    for p, t in zip(params, ts):
        assert_close(p.grad, t.double() * coef, torch.float32)
    for fn, grad in ((fusedls.l1_penalty, torch.sign), (fusedls.l2_penalty, lambda w: 2 * w)):
        ws = [t.clone().requires_grad_() for t in ts]
        (3.0 * fn(ws)).backward()
        for w, t in zip(ws, ts):
            assert_close(w.grad, 3.0 * grad(t.double()), torch.float32)


@pytest.mark.parametrize("chunks", [1, 2, 8])
def test_other_chunks_per_item(backend, monkeypatch, chunks):
    if backend != "triton":
        pytest.skip("FOREACH_NORM_CHUNKS is the triton kernels' setting")
    from fusedls.backend.triton import tuning

    monkeypatch.setattr(tuning, "FOREACH_NORM_CHUNKS", chunks)
    ts = _tensors(ITEM_SIZES + [(3 * ITEM + 2 * CHUNK,)], torch.float32, seed=9)
    flat = torch.cat([t.double().flatten() for t in ts])
    for ord in (2.0, 3.0, -math.inf):
        assert_close(torch.stack(fusedls.foreach_norm(ts, ord)), torch.stack([_ref_norm(t, ord) for t in ts]),
                     torch.float32, roundings=2)  # fmt: skip
        assert_close(fusedls.total_norm(ts, ord), _ref_norm(flat, ord), torch.float32, roundings=2)
    ws = [t.clone().requires_grad_() for t in ts]
    fusedls.l2_penalty(ws).backward()
    for w, t in zip(ws, ts):
        assert_close(w.grad, 2 * t.double(), torch.float32)


def test_table_work_items():
    if "triton" not in AVAILABLE:
        pytest.skip("triton unavailable")
    from fusedls.backend.triton import foreach_norm as K

    ts = _tensors([(ITEM,), (0,), (2 * ITEM + 5,), (7,)], torch.float32)
    tab = K.table(ts, ITEM)
    assert tab.first.tolist() == [0, 1, 1, 4, 5]
    assert tab.item_tensor.tolist() == [0, 2, 2, 2, 3]
    assert tab.item_start.tolist() == [0, 0, ITEM, 2 * ITEM, 0]


def test_unaligned_views(backend):
    buf = torch.randn(200, device=DEVICE)
    views = [buf[1:40], buf[50:51], buf[61:100].view(3, 13), buf[104:180]]  # the last one aligned
    for ord in (2.0, 1.0, math.inf):
        got = torch.stack(fusedls.foreach_norm(views, ord))
        assert_close(got, torch.stack([_ref_norm(v, ord) for v in views]), torch.float32)
    grads = [v.clone() for v in views]
    penalty = fusedls.l2_penalty([v.requires_grad_() for v in (g.clone() for g in grads)])
    assert_close(penalty, sum(g.double().square().sum() for g in grads), torch.float32)


def test_subnormal_inputs(backend):
    # the largest element is subnormal: the kernels lift the chunk by 2^64 before scaling
    # (a GPU that flushed subnormals to zero would give 0 here)
    ts = [torch.full((5,), 1e-41, device=DEVICE), torch.tensor([3e-42, -1e-40], device=DEVICE)]
    for ord in (2.0, 3.0):
        want = _ref_norm(torch.cat([t.double() for t in ts]), ord)
        assert_close(fusedls.total_norm(ts, ord), want, torch.float32)


def test_overflow_underflow(backend):
    big = [torch.full((50,), 1e30, device=DEVICE), torch.full((3,), -3e37, device=DEVICE)]
    small = [torch.full((20,), 1e-30, device=DEVICE), torch.full((5,), -2e-35, device=DEVICE)]  # squares: 0 in fp32
    for ts in (big, small, big + small):
        for ord in (2.0, 3.0):
            want = _ref_norm(torch.cat([t.double() for t in ts]), ord)
            got = fusedls.total_norm(ts, ord)
            assert torch.isfinite(got) and got > 0
            assert_close(got, want, torch.float32)
            for n, t in zip(fusedls.foreach_norm(ts, ord), ts):
                assert_close(n, _ref_norm(t, ord).float().double(), torch.float32)
    half = [torch.full((4,), 1e4, dtype=torch.float16, device=DEVICE)]  # squares overflow fp16, not fp32
    assert fusedls.foreach_norm(half)[0].item() == 20000.0


@pytest.mark.parametrize("ord", ORDS)
def test_nonfinite_propagate_as_torch(backend, ord):
    nan, inf = float("nan"), float("inf")
    ts = [torch.tensor(v, device=DEVICE) for v in ([1.0, nan, 2.0], [inf, 1.0], [-inf, nan], [0.0, 3.0], [0.0, 0.0])]
    got = torch.stack(fusedls.foreach_norm(ts, ord))
    want = torch.stack(torch._foreach_norm(ts, ord))
    assert_close(got, want.double(), torch.float32)
    total = fusedls.total_norm(ts[1:2] + ts[3:], ord)
    assert_close(total, _ref_norm(torch.cat(ts[1:2] + ts[3:]), ord), torch.float32)


def test_empty_lists_and_tensors(backend):
    assert fusedls.foreach_norm([]) == []
    assert fusedls.total_norm([]).item() == 0.0
    empty = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    assert [n.item() for n in fusedls.foreach_norm(empty)] == [0.0, 0.0]
    assert fusedls.total_norm(empty, 1).item() == 0.0
    params = [torch.nn.Parameter(torch.ones(3, device=DEVICE))]  # no grad
    total = fusedls.clip_grad_norm_(params, 1.0)
    assert total.item() == torch.nn.utils.clip_grad_norm_(params, 1.0).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        fusedls.clip_grad_norm_((p for p in []), 1.0)
    with pytest.raises(ValueError, match="empty"):
        fusedls.l2_penalty([])


def test_many_tensors_in_one_call(backend, monkeypatch):
    if backend == "triton":  # default chunks: ~1000 programs per launch are slow to interpret
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "FOREACH_NORM_BLOCK", 256)
    sizes = [(1 + (i * 7) % 13,) for i in range(1000)] + [(3000,), (170, 19)]
    ts = _tensors(sizes, torch.float32, seed=2)
    want = torch.stack(torch._foreach_norm([t.double() for t in ts], 2))
    assert_close(torch.stack(fusedls.foreach_norm(ts)), want, torch.float32)
    assert_close(fusedls.total_norm(ts), _ref_norm(torch.cat([t.flatten() for t in ts]), 2), torch.float32)


def test_bitwise_deterministic(backend):
    ts = _tensors([(1 + (i * 7) % 50,) for i in range(40)] + [(300,)], torch.float32, seed=4)
    for ord in (2.0, 1.0, 3.0):
        a, b = (fusedls.total_norm(ts, ord) for _ in range(2))
        assert torch.equal(a, b)
    a, b = (torch.stack(fusedls.foreach_norm(ts)) for _ in range(2))
    assert torch.equal(a, b)


def test_cpp_results_independent_of_thread_count(backend):
    if backend != "cpp":
        pytest.skip("the cpp backend's (tensor, block) work items over torch's threads")
    ts = _tensors([(1 + (i * 7) % 50,) for i in range(40)] + [(300,), (17, 9)], torch.float32, seed=5)
    ts += _tensors([(33,), (70,)], torch.bfloat16, seed=6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append([fusedls.total_norm(ts, ord) for ord in (2.0, 1.0, math.inf)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert_close(results[0][0], _ref_norm(torch.cat([t.double().flatten() for t in ts]), 2), torch.float32)


def test_fixed_number_of_launches(monkeypatch):
    if "triton" not in AVAILABLE:
        pytest.skip("triton unavailable")
    from fusedls.backend.triton import foreach_norm as K

    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel)
            return self.kernel[grid]

    for name in ("foreach_norm_partial_kernel", "foreach_norm_merge_kernel", "foreach_norm_total_kernel",
                 "foreach_map_kernel"):  # fmt: skip
        monkeypatch.setattr(K, name, Counting(getattr(K, name)))
    counts = []
    for n in (3, 40):
        params = [torch.nn.Parameter(torch.randn(5, device=DEVICE)) for _ in range(n)]
        params += [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16, device=DEVICE)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn_like(p)
        launches.clear()
        with fusedls.use_backend("triton"):
            fusedls.clip_grad_norm_(params, 0.1)
        counts.append(len(launches))
    assert counts == [6, 6]  # partials and scaling per dtype (2 each), merge, total


def _grads_module(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0).to(DEVICE)
    layer(torch.randn(5, 3, 16, device=DEVICE)).square().sum().backward()
    return layer


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.0, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(backend, norm_type, max_norm):
    ours = _grads_module()
    theirs = _grads_module()
    got = fusedls.clip_grad_norm_(ours.parameters(), max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type)
    assert got.dtype == want.dtype and got.shape == ()
    assert_close(got, want.double(), torch.float32)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32)


def test_clip_grad_norm_mixed_dtypes_and_layouts(backend):
    params = [torch.nn.Parameter(torch.randn(s, dtype=d, device=DEVICE)) for s in ((7,), (4, 5)) for d in DTYPES]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    params[3].grad = torch.randn(5, 4, dtype=params[3].dtype, device=DEVICE).t()  # dense, not contiguous
    params[1].grad = torch.randn(14, dtype=params[1].dtype, device=DEVICE)[::2]  # not dense
    params[0].grad = torch.randn(40, dtype=params[0].dtype, device=DEVICE)[3:10]  # not 16-byte aligned
    reference = [g.double() for g in (p.grad for p in params)]
    total = fusedls.clip_grad_norm_(params, 1.0)
    want = _ref_norm(torch.stack([_ref_norm(g, 2) for g in reference]), 2)
    assert total.dtype == torch.float32
    assert_close(total, want, torch.bfloat16)
    coef = min(1.0, 1.0 / (want.item() + 1e-6))
    for p, g in zip(params, reference):
        assert_close(p.grad, g * coef, p.grad.dtype, roundings=2)


def test_clip_that_clips_nothing_leaves_every_bit(backend):
    # coef = min(max_norm / norm, 1) = 1: the kernels skip the scaling pass (x * 1 = x); the
    # gradients keep every bit, -0.0 included, as torch's multiplication by 1 does.
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d, device=DEVICE)) for s in ((37,), (3, 50)) for d in DTYPES]
    for p in params:
        g = torch.randn(p.shape, dtype=torch.float64) * 1e-3
        g.view(-1)[:3] = torch.tensor([-0.0, 5e-3, -7e-3])
        p.grad = g.to(p.dtype).to(DEVICE)
    before = [p.grad.clone() for p in params]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for q, b in zip(theirs, before):
        q.grad = b.clone()
    total = fusedls.clip_grad_norm_(params, max_norm=1e4)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm=1e4)
    assert_close(total, torch.cat([b.double().reshape(-1) for b in before]).norm(), torch.float32)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    for p, q, b in zip(params, theirs, before):
        assert torch.equal(p.grad.view(bits[p.dtype]), b.view(bits[p.dtype]))
        assert torch.equal(p.grad.view(bits[p.dtype]), q.grad.view(bits[p.dtype]))


def test_clip_only_non_dense_grads(backend):
    params = [torch.nn.Parameter(torch.ones(5, device=DEVICE)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((10,), 3.0, device=DEVICE)[::2]
    total = fusedls.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert_close(total, torch.tensor(math.sqrt(90.0), dtype=torch.float64), torch.float32)
    for p in params:
        assert_close(p.grad, torch.full((5,), 3.0 / (math.sqrt(90.0) + 1e-6), dtype=torch.float64), torch.float32)


def test_clip_error_if_nonfinite(backend):
    ours = _grads_module()
    theirs = _grads_module()
    for m in (ours, theirs):
        next(m.parameters()).grad[0, 0] = float("nan")
    for m, clip in ((ours, fusedls.clip_grad_norm_), (theirs, torch.nn.utils.clip_grad_norm_)):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip(m.parameters(), 1.0, error_if_nonfinite=True)
    got = fusedls.clip_grad_norm_(ours.parameters(), 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    assert got.isnan() and want.isnan()
    assert all(p.grad.isnan().all() for p in ours.parameters())


def test_penalties_values_and_gradients(backend):
    ts = [t.requires_grad_() for d in DTYPES for t in _tensors([(5,), (3, 7), (40,)], d, seed=3)]
    pairs = ((fusedls.l1_penalty, lambda w: w.abs().sum()), (fusedls.l2_penalty, lambda w: w.square().sum()))
    for fn, formula in pairs:
        value = fn(ts)
        assert value.shape == () and value.dtype == torch.float32
        ref_ts = [t.detach().double().requires_grad_() for t in ts]
        ref = sum(formula(w) for w in ref_ts)
        assert_close(value, ref.detach(), torch.float32)
        (2.5 * value).backward()
        (2.5 * ref).backward()
        for t, r in zip(ts, ref_ts):
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, r.grad, t.dtype)
            t.grad = None
    zero = torch.zeros(3, device=DEVICE, requires_grad=True)  # d|w|/dw at 0 is 0
    fusedls.l1_penalty([zero]).backward()
    assert torch.equal(zero.grad, torch.zeros(3, device=DEVICE))


def test_regularization_penalty(backend):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(DEVICE)
    got = fusedls.regularization_penalty(model, l1=0.1, l2=0.01)
    weights = [model[0].weight, model[2].weight]  # biases and the norm weight skipped
    want = sum(0.1 * w.double().abs().sum() + 0.01 * w.double().square().sum() for w in weights)
    assert_close(got, want.detach(), torch.float32)
    got.backward()
    assert model[0].bias.grad is None and model[1].weight.grad is None
    w = model[0].weight.detach().double()
    assert_close(model[0].weight.grad, 0.1 * w.sign() + 0.02 * w, torch.float32)
    every = fusedls.regularization_penalty(model, l2=1.0, include=lambda name, p: True)
    assert_close(every, sum(p.double().square().sum() for p in model.parameters()).detach(), torch.float32)
    assert fusedls.regularization_penalty(model).item() == 0.0
    module = fusedls.nn.RegularizationPenalty(l1=0.1, l2=0.01)
    assert_close(module(model), want.detach(), torch.float32)


def test_bad_input():
    t = torch.ones(3)
    with pytest.raises(ValueError, match="ord"):
        fusedls.foreach_norm([t], "nuc")
    with pytest.raises(TypeError, match="ord"):
        fusedls.foreach_norm([t], None)
    with pytest.raises(ValueError, match="NaN"):
        fusedls.total_norm([t], float("nan"))
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        fusedls.foreach_norm([t, 3.0])
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        fusedls.foreach_norm([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="one device"):
        fusedls.total_norm([t, torch.ones(3, device="meta")])
    with pytest.raises(ValueError, match="empty"):
        fusedls.foreach_norm([torch.empty(0)], math.inf)
    with pytest.raises(ValueError, match="empty"):
        fusedls.total_norm([torch.empty(0)], -1.0)
    with pytest.raises(TypeError, match="max_norm"):
        fusedls.clip_grad_norm_([t], "1")
    with pytest.raises(TypeError, match=r"parameters\[0\]"):
        fusedls.clip_grad_norm_([1.0], 1.0)
    with pytest.raises(TypeError, match="module"):
        fusedls.regularization_penalty([t], l2=1.0)


# ------------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, backend, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from fusedls.backend.triton import tuning

        tuning.FOREACH_NORM_BLOCK, tuning.FOREACH_NORM_MERGE_BLOCK = 16, 4
        if backend == "cpp":
            import fusedls.backend.cpp.foreach_norm as cpp_foreach

            cpp_foreach.BLOCK = 16
        shards = _tensors([(5 + rank,), (37,), (3, 4 + rank)], torch.float32, seed=10 + rank, device="cpu")
        out = {}
        with fusedls.use_backend(backend):
            for ord in (2.0, 1.0, math.inf, 3.0):
                out[f"total{ord}"] = fusedls.total_norm(shards, ord, process_group=dist.group.WORLD).item()
            params = [torch.nn.Parameter(torch.zeros_like(s)) for s in shards]
            for p, s in zip(params, shards):
                p.grad = s.clone()
            out["clip"] = fusedls.clip_grad_norm_(params, 1.0, process_group=dist.group.WORLD).item()
            out["grads"] = [p.grad.clone() for p in params]
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["eager", "triton", "cpp"])
def test_process_group_matches_single_process(backend_name):
    """2 processes on gloo, each with its shards (CPU tensors), against the norm of all shards."""
    if backend_name == "triton" and not registry.interpreting():
        pytest.skip("gloo on CPU tensors: the triton backend runs them only under TRITON_INTERPRET=1")
    if backend_name not in AVAILABLE:
        pytest.skip(f"{backend_name} unavailable")
    import torch.multiprocessing as mp

    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_worker, args=(world, _free_port(), backend_name, results), nprocs=world, join=True)
        results = dict(results)
    shards = [_tensors([(5 + r,), (37,), (3, 4 + r)], torch.float32, seed=10 + r, device="cpu") for r in range(world)]
    flat = torch.cat([t.double().flatten() for rank in shards for t in rank])
    for ord in (2.0, 1.0, math.inf, 3.0):
        for r in range(world):
            assert_close(torch.tensor(results[r][f"total{ord}"]), _ref_norm(flat, ord), torch.float32)
    norm = _ref_norm(flat, 2)
    coef = min(1.0, 1.0 / (norm.item() + 1e-6))
    for r in range(world):
        assert_close(torch.tensor(results[r]["clip"]), norm, torch.float32)
        for got, shard in zip(results[r]["grads"], shards[r]):
            assert_close(got, shard.double() * coef, torch.float32)


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(DEVICE)
    x = torch.randn(4, 6, device=DEVICE)

    def step(x):
        # loss + regularisation, then (below) the norms a training loop logs
        loss = model(x).square().mean() + fusedls.regularization_penalty(model, l1=1e-3, l2=1e-2)
        return loss, fusedls.total_norm([p for p in model.parameters()], 2), fusedls.foreach_norm(
            [p for p in model.parameters()], 1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, total, norms = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_loss, ref_total, ref_norms = step(x)
    ref_loss.backward()
    assert_close(loss, ref_loss.double().detach())
    assert_close(total, ref_total.double())
    for a, b in zip(norms, ref_norms):
        assert_close(a, b.double())
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad.double())
    clip = torch.compile(lambda: fusedls.clip_grad_norm_(model.parameters(), 0.01), fullgraph=True, backend="aot_eager")
    want = fusedls.total_norm([p.grad for p in model.parameters()])
    assert_close(clip(), want.double())
    assert_close(fusedls.total_norm([p.grad for p in model.parameters()]), torch.tensor(0.01, dtype=torch.float64),
                 torch.bfloat16)


@settings(max_examples=30, **PROPERTY_SETTINGS)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), max_size=2).map(tuple), min_size=1, max_size=6),
    long=st.integers(0, 3 * ITEM + 3),  # one tensor across several work items, maybe
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
    ord=st.sampled_from(ORDS),
    max_norm=st.sampled_from([0.3, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_property_random_lists(backend, shapes, long, dtypes, ord, max_norm, seed):
    # Random lists (empty tensors, scalars, mixed dtypes): per-tensor norms, the total and the
    # clipped gradients against float64.
    shapes = [*shapes, (long,)]
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtypes[i % len(dtypes)]).to(DEVICE)
          for i, s in enumerate(shapes)]  # fmt: skip
    if (ord < 0 or ord == math.inf) and any(t.numel() == 0 for t in ts):
        with pytest.raises((RuntimeError, ValueError)):  # torch refuses these orders on empty tensors
            fusedls.foreach_norm(ts, ord)
        return
    norms = [_ref_norm(t, ord) for t in ts]
    for n, t, want in zip(fusedls.foreach_norm(ts, ord), ts, norms):
        assert_close(n, want.to(t.dtype).double(), t.dtype, msg=f"ord {ord}")
    out_dtype = functools.reduce(torch.promote_types, [t.dtype for t in ts])  # torch's get_total_norm
    total = _ref_norm(torch.cat([t.double().flatten() for t in ts]), ord)
    got = fusedls.total_norm(ts, ord)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.double(), total.to(out_dtype).double(), **_tol_sum(out_dtype, ord))
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
    for p, t in zip(params, ts):
        p.grad = t.clone()
    clip_total = torch.linalg.vector_norm(torch.stack(norms), ord)  # torch: the norm of the norms
    got = fusedls.clip_grad_norm_(params, max_norm, ord)
    torch.testing.assert_close(got.double(), clip_total.to(out_dtype).double(), **_tol_sum(out_dtype, ord))
    coef = min(1.0, max_norm / (float(got) + 1e-6))
    for p, t in zip(params, ts):
        assert_close(p.grad, t.double() * coef, t.dtype, msg=f"clipped grad ord {ord}", roundings=2)
