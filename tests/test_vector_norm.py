"""Parity of fusedls.vector_norm with torch.linalg.vector_norm (float64, same rounded inputs),
per backend (eager, and triton through the interpreter on CPU)."""

import math

import pytest
import torch

import fusedls
from fusedls.testing import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cross_entropy import PROPERTY_SETTINGS, same_layout

INF = float("inf")
NAN = float("nan")
ORDS = [2, 1, INF, -INF, 0, 3, 0.5, 1.5, -1, -2.5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (dim, keepdim): every dimension, the last, several (out of order), one in the middle, ()
DIMS = [(None, False), (None, True), (-1, False), ((2, 0), True), (1, False), ((), False)]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log2(0) in the interpreter


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 fp32 / 64 16-bit elements, so rows of a few dozen elements run the chunk
    loop several times with a masked tail and short rows share a tile; rows of >= 64 elements
    are split among the programs (2 "SMs" x 2 programs), so the two-stage path runs too."""
    if "triton" in [b.name for b in fusedls.backends() if b.available]:
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "VECTOR_NORM_TILE", {2: 64, 4: 32})
        monkeypatch.setattr(tuning, "VECTOR_NORM_SPLIT_COLS", 32)
        monkeypatch.setattr(tuning, "VECTOR_NORM_INTERPRETER_SMS", 2)
        monkeypatch.setattr(tuning, "VECTOR_NORM_MERGE_BLOCK", 4)


def data(shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def reference(x, ord, dim=None, keepdim=False, upstream=None, dtype=None):
    """torch in float64 on x's (rounded) values: (norm, d(norm * upstream)/dx or None)."""
    x64 = x.detach().double().requires_grad_()
    ref = torch.linalg.vector_norm(x64, ord, dim, keepdim)
    if upstream is None or ord == 0:
        return ref.detach(), None
    (grad,) = torch.autograd.grad(ref, x64, upstream.double())
    return ref.detach(), grad


def check(x, ord, dim=None, keepdim=False, dtype=None, seed=1):
    """fusedls against the float64 reference: value, shape, dtype and the gradient of a random
    upstream gradient (ord 0: no gradient, as torch)."""
    out_dtype = dtype or x.dtype
    xa = same_layout(x).requires_grad_()
    out = fusedls.vector_norm(xa, ord, dim, keepdim, dtype=dtype)
    expected = torch.linalg.vector_norm(x.detach().to(out_dtype), ord, dim, keepdim)
    assert out.shape == expected.shape and out.dtype == out_dtype == expected.dtype
    up = data(out.shape, out_dtype, x.device, seed=seed)
    ref, ref_grad = reference(x, ord, dim, keepdim, up)
    assert_close(out, ref, out_dtype, f"norm ord={ord}")
    out.backward(up)
    if ord == 0:
        assert xa.grad is None
    else:
        assert_close(xa.grad, ref_grad, x.dtype, f"grad ord={ord}")
    return out, xa.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,keepdim", DIMS)
@pytest.mark.parametrize("ord", ORDS)
def test_values_and_gradients(backend, small_tiles, device, ord, dim, keepdim, dtype):
    # (2, 3, 41): the last dim is two fp32 chunks of 32 (the second masked), dim=None (246) splits
    x = data((2, 3, 41), dtype, device, scale=0.5)
    x[1, 2, 5] = 0.0  # a zero element: ord 0 counts it out, p < 0 gives 0, gradients at 0
    check(x, ord, dim, keepdim)


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((), None), ((), 0), ((1, 1), -1), ((7, 1), (0, 1)), ((300, 3), 1)])
def test_shapes(backend, small_tiles, device, ord, shape, dim):
    # single elements, 0-dim input, many short rows (tiles of many rows, a masked last tile)
    check(data(shape, torch.float32, device), ord, dim)
    check(data(shape, torch.float32, device), ord, dim, keepdim=True)


@pytest.mark.parametrize("ord", ORDS)
def test_split_path_matches_and_is_deterministic(backend, small_tiles, device, ord):
    from fusedls.backend.triton import tuning  # noqa: F401  (only to document what small_tiles sets)

    x = data((3, 50, 7), torch.bfloat16, device)  # dim=None: one row of 1050 elements
    if backend == "triton":
        splits, per = tuning.vector_norm_split(torch.device(device), 1, x.numel(), 64)
        assert splits >= 4 and per % 64 == 0, (splits, per)
    first, grad = check(x, ord)
    again, grad_again = check(x, ord)
    assert torch.equal(first, again)  # the same bits, run after run
    if grad is not None:
        assert torch.equal(grad, grad_again)
    # a few long rows: the row blocks cannot occupy the programs either
    check(data((2, 600), torch.float32, device), ord, -1)


@pytest.mark.parametrize("ord", [2, 1, 3, 0.5, 1.5, -1, -2.5, 8, INF])
@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 3e-39])
def test_no_overflow_or_underflow_in_fp32(backend, small_tiles, device, ord, magnitude):
    # Squares / cubes of 1e30 overflow fp32 and those of 1e-30 underflow (3e-39 is subnormal);
    # the true norm (float64) is an ordinary fp32 number, and so is fusedls's, within fp32's
    # relative tolerance (compared after dividing by the magnitude, atol being meaningless here).
    x = data((2, 45), torch.float64, device).abs() + 0.5
    x[0, 3] = -x[0, 3]
    x = (x * magnitude).float().requires_grad_()
    up = data((2,), torch.float32, device, seed=2)
    ref, ref_grad = reference(x, ord, -1, upstream=up)
    out = fusedls.vector_norm(x, ord, -1)
    assert_close(out.double() / magnitude, ref / magnitude, torch.float32)
    out.backward(up)
    assert_close(x.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("ord", [2, 1, 3, 0.5, -1.5, 8])
@pytest.mark.parametrize("magnitude", [1e200, 1e-200])
def test_no_overflow_or_underflow_in_fp64(backend, device, ord, magnitude):
    # fp64 runs eagerly, whose scaled sums keep 1e200 (squares overflow fp64) and 1e-200 finite;
    # the norm is homogeneous: norm(x) = m norm(x / m), and its gradient is the same for both.
    y = data((3, 40), torch.float64, device).abs() + 0.5
    x = (y * magnitude).requires_grad_()
    up = data((3,), torch.float64, device, seed=2)
    ref, ref_grad = reference(y, ord, -1, upstream=up)
    out = fusedls.vector_norm(x, ord, -1)
    assert_close(out / magnitude, ref)
    out.backward(up)
    assert_close(x.grad, ref_grad)


@pytest.mark.parametrize("ord", [2, 1, INF, -INF, 0])
def test_plain_and_scaled_sums_side_by_side(backend, small_tiles, device, ord):
    # ord 1 and 2 take a plain fp32 sum where it is safe and sweep again with scaling where it
    # is not (sums outside [2^-64, 2^100]); both kinds of state must meet correctly in one tile
    # (rows of 1e30, 1 and 1e-30 side by side) and among one row's partials (4 slices of 128 in
    # the interpreter, 16 of 32 on an H100): the first's sum just outside the bound and the
    # others' inside, with comparable norms.
    # The other ords read the same data.
    x = data((6, 7), torch.float32, device)
    x[0] *= 1e30
    x[2] *= 1e-30
    check(x, ord, -1)
    p = 1 if ord == 1 else 2
    splits, per = 4, 128  # the eager backend's slices do not matter; the Triton one's on this device:
    if "triton" in [b.name for b in fusedls.backends() if b.available]:
        from fusedls.backend.triton import tuning

        splits, per = tuning.vector_norm_split(torch.device(device), 1, 512, 32)
    assert splits >= 2
    g = torch.Generator().manual_seed(3)
    for bound, k, safe in [(2.0**-64, 0.5, 4.0), (2.0**100, 2.0, 0.25)]:
        unsafe = (k * bound / per) ** (1 / p)  # per terms of unsafe^p sum to k bound
        y = (0.9 + 0.1 * torch.rand(512, generator=g, dtype=torch.float64)).to(device)
        y[:per] *= unsafe
        y[per:] *= unsafe * safe
        check(y.float(), ord, None)


@pytest.mark.parametrize("ord,value,torch_fp32", [(2, 1e30, INF), (3, 1e30, INF), (2, 1e-30, 0.0), (-2, 1e-30, 0.0)])
def test_where_torch_overflows_or_underflows(backend, device, ord, value, torch_fp32):
    x = torch.full((4,), value, device=device)
    assert torch.linalg.vector_norm(x, ord).item() == torch_fp32
    expected = value * 4 ** (1 / ord)
    assert fusedls.vector_norm(x, ord).item() == pytest.approx(expected, rel=1e-6)


def test_half_precision_accumulates_in_fp32(backend, device):
    x = torch.full((4,), 1e4, dtype=torch.float16, device=device)
    assert fusedls.vector_norm(x).item() == 20000.0  # each square overflows fp16
    y = torch.full((64,), 3e38, dtype=torch.float32, device=device)
    assert fusedls.vector_norm(y).item() == INF  # the norm itself overflows: inf, as torch


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_nan_and_inf_propagate_as_in_torch(backend, small_tiles, device, ord, special):
    x = data((3, 40), torch.float32, device)
    x[0, 7] = special  # row 0: one special value in the first chunk; row 1: in the last
    x[1, 39] = special
    x[2, 11] = 0.0  # row 2: finite
    check(x, ord, -1)
    check(x, ord, None)  # the split path


@pytest.mark.parametrize("ord", [INF, -INF])
def test_ties_share_the_gradient(backend, small_tiles, device, ord):
    x = torch.tensor([[3.0, -3.0, 1.0, 0.5], [1.0, -1.0, 4.0, 1.0]], device=device)
    xa = x.clone().requires_grad_()
    fusedls.vector_norm(xa, ord, -1).sum().backward()
    xt = x.clone().requires_grad_()
    torch.linalg.vector_norm(xt, ord, -1).sum().backward()
    torch.testing.assert_close(xa.grad, xt.grad, rtol=0, atol=0)
    # ties in different chunks of a long row and in different splits
    x = data((2, 300), torch.float32, device)
    peak = 1.0 + x.abs().max() if ord > 0 else 0.0
    x[:, [3, 100, 299]] = torch.tensor([peak, -peak, peak], device=device)
    check(x, ord, -1)
    check(x, ord, None)


@pytest.mark.parametrize("ord", [INF, -INF])
@pytest.mark.parametrize("special", [None, NAN, INF])
def test_extremes_without_a_gradient(backend, small_tiles, device, ord, special):
    # Without a backward to follow, the ties are not counted (the Triton kernel skips them):
    # the norm must not change, in the row and split paths, ties, NaN and inf included.
    x = data((3, 300), torch.float32, device)
    x[:, [3, 100, 299]] = x[:, [5]]
    if special is not None:
        x[1, 150] = special
    expected = [torch.linalg.vector_norm(x, ord, dim) for dim in (-1, None)]
    with torch.no_grad():
        got = [fusedls.vector_norm(x.clone().requires_grad_(), ord, dim) for dim in (-1, None)]
    got += [fusedls.vector_norm(x, ord, dim) for dim in (-1, None)]
    for out, ref in zip(got, expected + expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("ord", [2, 1, 3, 1.5, 0.5, -1])
def test_zero_vector_has_zero_gradient(backend, device, ord):
    out, grad = check(torch.zeros(2, 5, device=device), ord, -1)
    assert (out == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("ord", ORDS)
def test_empty(backend, device, ord):
    check(torch.empty(0, 5, device=device), ord, 1)  # no rows: empty result, whatever ord
    check(torch.empty(0, 5, device=device), ord, 1, keepdim=True)
    for x, dim in [(torch.empty(2, 0, device=device), 1), (torch.empty(0, 3, device=device), None),
                   (torch.empty(0, 3, device=device), 0)]:  # fmt: skip
        if ord < 0 or math.isinf(ord):  # no identity: torch raises, and so does fusedls
            with pytest.raises(RuntimeError, match="empty"):
                torch.linalg.vector_norm(x, ord, dim)
            with pytest.raises(RuntimeError, match="empty"):
                fusedls.vector_norm(x, ord, dim)
        else:
            out, _ = check(x, ord, dim)
            assert (out == 0).all()


def test_dtype_argument(backend, small_tiles, device):
    x = data((3, 41), torch.bfloat16, device)
    out, grad = check(x, 2, -1, dtype=torch.float32)  # computed and returned in fp32
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    out, _ = check(data((3, 41), torch.float32, device), 3, -1, dtype=torch.float64)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("ord", [2, INF, 0.5])
def test_non_contiguous_inputs(backend, small_tiles, device, ord):
    x = data((6, 41), torch.float32, device)
    check(x.t(), ord, 0)  # the reduced dim is strided: moved to the end, copied
    check(x[:, ::2], ord, -1)  # strided columns
    check(x[::2], ord, -1)  # strided rows, contiguous columns: a view
    check(x[:1].expand(4, 41), ord, -1)  # broadcast rows (stride 0)
    check(data((4, 5, 6), torch.float32, device).permute(2, 0, 1), ord, (1, 2))


def test_rows_view_without_copy(monkeypatch, device):
    seen = []
    real = fusedls.ops.vector_norm.VectorNormFunction.apply
    monkeypatch.setattr(fusedls.ops.vector_norm.VectorNormFunction, "apply",
                        lambda rows, *a: seen.append(rows) or real(rows, *a))  # fmt: skip
    x = data((4, 5, 6), torch.float32, device)
    fusedls.vector_norm(x, 2, (1, 2))
    fusedls.vector_norm(x, 2, None)
    assert all(r.data_ptr() == x.data_ptr() for r in seen) and len(seen) == 2


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the class is what is compared)
        return type(exc)
    return None


@pytest.mark.parametrize(
    "args",
    [
        dict(ord="fro"), dict(ord=None), dict(dim=5), dict(dim=-4), dict(dim=(0, 0)), dict(dim=(0, -3)),
        dict(dim=1.0), dict(dim=(0, "a")), dict(dtype=torch.int32), dict(dtype=torch.float16),
        dict(dtype=torch.complex64),
    ],
)
def test_bad_arguments_raise_torchs_error_class(args, device):
    x = torch.ones(3, 4, 5, device=device)
    expected = _raised(lambda: torch.linalg.vector_norm(x, **args))
    assert expected is not None
    with pytest.raises(expected):
        fusedls.vector_norm(x, **args)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_integer_input_raises_as_torch(device, dtype):
    x = torch.ones(3, dtype=torch.int64, device=device)
    expected = _raised(lambda: torch.linalg.vector_norm(x, dtype=dtype))
    with pytest.raises(expected, match="floating"):
        fusedls.vector_norm(x, dtype=dtype)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusedls.vector_norm([1.0, 2.0])


def test_complex_and_nan_ord_are_torchs(device):
    z = torch.randn(3, 4, dtype=torch.complex64, device=device)
    torch.testing.assert_close(fusedls.vector_norm(z, 3, -1), torch.linalg.vector_norm(z, 3, -1))
    x = torch.randn(3, 4, device=device)
    assert fusedls.vector_norm(x, NAN).isnan().all()
    assert fusedls.vector_norm(x, True).item() == pytest.approx(x.abs().sum().item())  # bool is 1, as torch


@pytest.mark.parametrize("ord", [2, INF, 0, -1.5])
def test_compile_fullgraph(backend, device, ord):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 41).to(device)
    x = torch.randn(6, 8, device=device)

    def step(x):
        return fusedls.vector_norm(lin(x), ord, -1).sum() + fusedls.vector_norm(lin(x), ord).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x)
    if ord != 0:
        loss.backward()
        grads = [p.grad.clone() for p in lin.parameters()]
        lin.zero_grad()
    expected = step(x)
    assert_close(loss, expected.double())
    if ord != 0:
        expected.backward()
        for got, want in zip(grads, [p.grad for p in lin.parameters()]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_benchmark_checks_and_times_every_provider(tmp_path, monkeypatch):
    import json

    from fusedls import bench
    from fusedls.bench import vector_norm as vb
    from fusedls.bench.core import Case

    monkeypatch.setattr(vb, "COMPILE_BACKEND", "eager")  # dynamo without inductor's C++ build
    tiny = dict(device="cpu", modes=["fwd", "bwd", "fwd+bwd"], dtypes=["fp32"], rows=[1, 16], cols=[8192],
                budget_s=0.005, plot=False, progress=False, echo=lambda text: None,
                providers=["torch*", "fusedls/eager"])  # fmt: skip
    assert bench.run(["vector_norm"], out=tmp_path, **tiny).exit_code == 0
    rows = json.loads((tmp_path / "vector_norm.json").read_text())["rows"]
    assert {(r["mode"], r["rows"]) for r in rows} == {(m, n) for m in tiny["modes"] for n in (1, 16)}
    for r in rows:
        if r["provider"] != "copy":
            assert r["status"] == "ok" and r["median_ms"] > 0, r
            assert r["bytes"] == vb.TRAFFIC[r["mode"]] * 16 * 8192 * 4 // (16 if r["rows"] == 1 else 1)
    assert vb.BENCH.bytes(Case("fwd+bwd", "bf16", 16384, 4096)) == 3 * 16384 * 4096 * 2
    assert {p.name for p in vb.BENCH.providers()} >= {"torch", "torch.compile", "fusedls/eager", "fusedls/triton"}


def test_a_wrong_result_fails_the_benchmark(tmp_path, monkeypatch):
    from fusedls.bench.__main__ import main as bench_main

    real = fusedls.vector_norm
    monkeypatch.setattr(fusedls, "vector_norm", lambda *a, **k: real(*a, **k) * 1.001)
    code = bench_main(["--op", "vector_norm", "--device", "cpu", "--mode", "fwd", "--dtype", "fp32", "--rows", "8",
                       "--cols", "64", "--budget", "0.005", "--no-plot", "--no-progress", "--out", str(tmp_path),
                       "--providers", "torch", "fusedls/eager"])  # fmt: skip
    assert code == 1


def test_ord_zero_output_requires_grad_like_torch(device):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    assert fusedls.vector_norm(x, 0).requires_grad == torch.linalg.vector_norm(x, 0).requires_grad


@pytest.mark.parametrize("ord", [2, 1, 3, 0.5, 1.5, -1, -2.5, INF, -INF])
@pytest.mark.parametrize("dim", [None, -1, (0, 2)])
def test_gradcheck_fp64(device, ord, dim):
    # finite differences of fusedls itself (fp64: the eager backend); no ties, no zeros
    signs = torch.tensor([1.0, -1.0] * 15, device=device).view(2, 3, 5)
    x = ((data((2, 3, 5), torch.float64, device).abs() + 0.1) * signs).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fusedls.vector_norm(t, ord, dim), (x,))


@settings(max_examples=40, **PROPERTY_SETTINGS)
@given(
    # one long row (chunk loop, split path) or a few short dims (tiles of several rows); small
    # enough for the interpreter
    shape=st.one_of(st.lists(st.integers(0, 70), max_size=1), st.lists(st.integers(0, 9), min_size=2, max_size=3)),
    dims=st.data(),
    keepdim=st.booleans(),
    ord=st.sampled_from(ORDS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    zeros=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_dims(backend, small_tiles, device, shape, dims, keepdim, ord, dtype, zeros, seed):
    ndim = len(shape)
    dim = dims.draw(st.one_of(
        st.none(),
        st.integers(-ndim, ndim - 1) if ndim else st.none(),
        st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim).map(tuple) if ndim else st.none(),
    ))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.masked_fill(torch.rand(shape, generator=g) < zeros, 0.0).to(dtype).to(device)
    try:
        torch.linalg.vector_norm(x, ord, dim, keepdim)
    except (RuntimeError, IndexError, ValueError) as exc:  # torch refuses: so must fusedls, with the same class
        with pytest.raises(type(exc)):
            fusedls.vector_norm(x, ord, dim, keepdim)
        return
    check(x, ord, dim, keepdim, seed=seed)
