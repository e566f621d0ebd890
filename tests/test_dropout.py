"""dropout, dropout_add and dropout + add + RMSNorm/LayerNorm, on every backend.

Randomness is checked statistically (kept fraction within 5 binomial standard deviations) and
structurally (survivors exactly x/(1-p), same seed same mask, consecutive calls differ, rows
far apart differ, backward uses the forward mask). Values are compared with torch's unfused
composition in float64, applied with the mask the op used (recovered from its output).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedls
from fusedls.backend import registry
from fusedls import dropout, dropout_add, dropout_add_layer_norm, dropout_add_rms_norm
from fusedls.nn import Dropout, DropoutAddLayerNorm, DropoutAddRMSNorm
from fusedls.testing import assert_close, rounding_condition

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seeded():
    """Statistical checks reproducible whatever ran before (5-sigma bounds: ~1e-6 to fail)."""
    torch.manual_seed(1234)


def rand_away_from_zero(shape, dtype, device, seed=1):
    """|x| in [0.5, 1.5): a dropped element (0) never looks like a kept one after any add."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) + 0.5) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return x.to(dtype).to(device)


def randn(shape, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# -------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(3000,), (37, 61)])
def test_kept_fraction_and_survivors(backend, device, p, shape):
    x = rand_away_from_zero(shape, torch.float32, device)
    y = dropout(x, p)
    kept = y != 0
    n = x.numel()
    assert abs(kept.double().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    want = (x.float() * (1.0 / (1.0 - p))).to(x.dtype)
    assert torch.equal(y[kept], want[kept])  # survivors exactly x/(1-p), rounded once


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_dtypes(backend, device, dtype):
    x = rand_away_from_zero((13, 17), dtype, device)
    y = dropout(x, 0.25)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    acc = torch.promote_types(dtype, torch.float32)
    assert torch.equal(y[kept], (x.to(acc) * (1 / 0.75)).to(dtype)[kept])


def test_seed_reproducible_and_consecutive_calls_differ(backend, device):
    x = rand_away_from_zero((40, 33), torch.float32, device)
    torch.manual_seed(0)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(0)
    a2 = dropout(x, 0.5)
    assert torch.equal(a, a2)
    assert not torch.equal(a != 0, b != 0)
    g1, g2 = (torch.Generator(device=device).manual_seed(7) for _ in range(2))
    assert torch.equal(dropout(x, 0.5, generator=g1), dropout(x, 0.5, generator=g2))
    # the generator advances: its next draw differs from a fresh one's
    fresh = torch.Generator(device=device).manual_seed(7)
    assert not torch.equal(dropout(x, 0.5, generator=g1), dropout(x, 0.5, generator=fresh))


def test_far_apart_elements_independent(backend, device):
    # Rows r and r + k (k a power of two: a tile or counter period would show there) and columns
    # c and c + 8 k (the next Philox counters) must not repeat; neighbours are independent.
    m = dropout(torch.ones(256, 64, device=device), 0.5) != 0
    for r in (0, 1, 5):
        for k in (1, 8, 32, 64, 128):
            assert not torch.equal(m[r], m[r + k])
    for k in (1, 2, 4):
        assert not torch.equal(m[:, : 8 * k], m[:, 8 * k : 16 * k])
    # neighbours independent: P(both kept) ~ 1/4, along rows and across the 16-bit halves
    flat = m.reshape(-1)
    both = (flat[:-1] & flat[1:]).double().mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / flat.numel())


def _mask(op, shape, device, seed=5, **kwargs):
    """The mask ``op`` draws for ``shape`` under ``torch.manual_seed(seed)`` (inputs of ones)."""
    x = torch.ones(shape, device=device)
    torch.manual_seed(seed)
    if op == "dropout":
        return dropout(x, 0.3, **kwargs) != 0
    if op == "dropout_add":
        return dropout_add(x, torch.zeros_like(x), 0.3, **kwargs) != 0
    return dropout_add_rms_norm(x, None, None, 0.3, **kwargs)[1] != 0  # h = dropout(x)


@pytest.mark.parametrize("shape", [(37, 61), (3, 2000), (1000,), ()])
def test_every_backend_and_kernel_draws_the_same_mask(device, monkeypatch, shape):
    # The mask is a function of (seed, row, column, N) alone: the same bits from the eager backend
    # (Philox in torch ops), the triton kernels (any tile), the cpp kernels, and from dropout,
    # dropout_add and the fused norm.
    from conftest import AVAILABLE

    ops = ("dropout", "dropout_add", "dropout_add_rms_norm") if shape else ("dropout", "dropout_add")
    with fusedls.use_backend("eager"):
        want = _mask("dropout", shape, device)
        for op in ops[1:]:
            assert torch.equal(_mask(op, shape, device), want), op
    assert 0.6 < want.double().mean() < 0.8 or want.numel() < 100
    backends = [b for b in ("triton", "cpp") if b in AVAILABLE and registry.has_implementation("dropout", b)]
    for backend in backends:
        with fusedls.use_backend(backend):
            for op in ops:
                if op == "dropout_add_rms_norm" and shape[-1] > 1024:
                    continue  # beyond the rows these tests give the norm kernel
                assert torch.equal(_mask(op, shape, device), want), (backend, op)
    if "triton" in backends:
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "DROPOUT_TILE", 64)
        monkeypatch.setattr(tuning, "DROPOUT_BLOCK_N", 16)  # many tiles per row, several rows per tile
        with fusedls.use_backend("triton"):
            assert torch.equal(_mask("dropout", shape, device), want)


def test_mask_bits_are_philox_4x32_10():
    # Random123's known answer for Philox-4x32-10, counter 0 and key 0; the draw of element (r, c)
    # is the half c % 2 of word (c % 8) // 2 of counter r * ceil(N / 8) + c // 8.
    from fusedls.backend.eager.dropout import keep_mask, philox4x32

    words = philox4x32(torch.tensor(0), torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    seed, n = torch.tensor(77), 21  # 3 counters a row
    w = torch.stack(philox4x32(seed, torch.arange(6)), -1)  # rows 0 and 1
    draws = torch.stack((w & 0xFFFF, w >> 16), -1).reshape(2, 24)[:, :n]
    t = fusedls.backend.protocols.dropout_threshold(0.3)
    assert t == round(0.3 * 65536)
    assert torch.equal(keep_mask(seed, slice(0, 2), n, 0.3, torch.device("cpu")), draws >= t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with 12 GB free")
def test_offsets_beyond_int32(backend, device):
    # 2^31 + 4096 elements: with 32-bit offsets the tail's mask would repeat the head's.
    if backend != "triton" or device != "cuda":
        pytest.skip("compiled kernels only")
    x = torch.ones(2**31 + 4096, dtype=torch.bfloat16, device=device)
    m = dropout(x, 0.5) != 0
    del x
    head, tail = m[:4096], m[2**31 :]
    assert not torch.equal(head, tail)
    assert abs(tail.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 4096)


def test_backward_uses_forward_mask(backend, device):
    x = rand_away_from_zero((21, 45), torch.float32, device).requires_grad_()
    y = dropout(x, 0.3)
    g = randn(x.shape, torch.float32, device)
    (y * g).sum().backward()
    mask = y.detach() != 0
    assert torch.equal(x.grad, (g * mask * (1 / 0.7)).float())


def test_p_zero_one_eval(backend, device):
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0], device=device, requires_grad=True)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x
    y = dropout(x, 1.0)
    torch.testing.assert_close(y, F.dropout(x, 1.0), equal_nan=True)  # torch: input * 0
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    m = Dropout(0.4)
    assert isinstance(m, torch.nn.Dropout)
    m.eval()
    assert m(x) is x


def test_non_contiguous(backend, device):
    base = rand_away_from_zero((30, 20), torch.float32, device)
    x = base.t()
    torch.manual_seed(3)
    y = dropout(x, 0.5)
    torch.manual_seed(3)
    want = dropout(x.contiguous(), 0.5)
    assert torch.equal(y, want) and y.shape == x.shape


def test_inplace_matches_torch(backend, device):
    x = rand_away_from_zero((10, 12), torch.float32, device)
    y = dropout(x, 0.5, inplace=True)
    assert y is x and ((x == 0) | (x.abs() >= 0.5 / 0.5 - 1e-6)).all()
    for p in (0.0, 1.0):
        z = rand_away_from_zero((5,), torch.float32, device)
        assert dropout(z, p, inplace=True) is z
    # same mask as out of place for the same seed, contiguous (kernel writes over x) or not
    for make in (lambda t: t, lambda t: t.t()):
        base = rand_away_from_zero((8, 6), torch.float32, device)
        torch.manual_seed(11)
        want = dropout(make(base), 0.5)
        z = make(base.clone())
        torch.manual_seed(11)
        assert dropout(z, 0.5, inplace=True) is z and torch.equal(z, want)
    # non-leaf: gradient flows through the in-place result; leaf requiring grad: torch's error
    leaf = rand_away_from_zero((6, 7), torch.float32, device).requires_grad_()
    h = leaf * 1.0
    out = dropout(h, 0.5, inplace=True)
    assert out is h
    out.sum().backward()
    assert torch.equal(leaf.grad, (out.detach() != 0) * 2.0)
    with pytest.raises(RuntimeError):
        F.dropout(leaf, 0.5, inplace=True)
    with pytest.raises(RuntimeError):
        dropout(leaf, 0.5, inplace=True)


# ---------------------------------------------------------------------------------- dropout_add


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_add(backend, device, dtype, p, with_bias):
    x = rand_away_from_zero((9, 24), dtype, device).requires_grad_()
    r = randn((9, 24), dtype, device).requires_grad_()
    b = (randn((24,), dtype, device, seed=5) * 0.1).requires_grad_() if with_bias else None
    out = dropout_add(x, r, p, bias=b)
    assert out.dtype == dtype
    g = randn(out.shape, dtype, device, seed=3)
    grads = torch.autograd.grad(out, [t for t in (x, r, b) if t is not None], g)
    xb = x.double() + (b.double() if with_bias else 0.0)
    mask = (out.double() - r.double()) != 0 if p else torch.ones_like(xb, dtype=torch.bool)
    scale = 1 / (1 - p)
    assert_close(out, r.double() + xb * mask * scale)
    dx = g.double() * mask * scale
    assert_close(grads[0], dx)
    assert_close(grads[1], g.double())
    if with_bias:
        # sum over rows of dx, itself rounded to the dtype: u sum |dx| + u |db| <= rtol sum |dx|
        assert_close(grads[2], dx.sum(0), condition=dx.abs().sum(0))


# ------------------------------------------------------------------------------- norm variants


def _norm_reference(x, r, w, b, mask, scale, is_rms, eps, dy, dh_next, h_op):
    """The unfused torch composition in float64 under the given mask: ``(y, h, {name: (gradient,
    condition)})`` for "x", "residual", "weight", "bias" (those given), h before rounding. The norm
    and the gradients are those of the h the op stored (h rounded to the dtype, as torch's
    composition rounds it).

    Conditions (see fusedls.testing.assert_close), in units of one rounding's relative error u: dx
    and dresidual are differences of terms of the size of rstd |dy w| that cancel, computed in fp32
    and rounded once: relative to ``rounding_condition(grad, h)``, |grad| + sum_j |d grad / d h_j|
    |h_j|, which covers those terms; the weight's and bias's gradients are fp32 sums over rows,
    rounded once: relative to sum |dy xhat| and sum |dy|. The table's rtol (2u in bf16) is one
    rounding and room for the fp32 arithmetic.
    """
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    x64, r64, w64, b64 = leaves
    exact = x64 * mask * scale + (r64 if r64 is not None else 0.0)
    h = exact + (h_op.detach().double() - exact).detach()  # the stored value, exact's gradient
    n = (x.shape[-1],)
    y = F.rms_norm(h, n, w64, eps) if is_rms else F.layer_norm(h, n, w64, b64, eps)
    wants = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((y, h), wants, (dy.double(), dh_next.double()), create_graph=True)
    xhat = (F.rms_norm(h, n, None, eps) if is_rms else F.layer_norm(h, n, None, None, eps)).detach()
    rows = tuple(range(x.dim() - 1))
    names = [name for name, t in zip(("x", "residual", "weight", "bias"), (x, r, w, b)) if t is not None]
    out = {}
    for name, g in zip(names, grads):
        if name in ("x", "residual"):
            out[name] = g.detach(), rounding_condition(g, h)
        else:
            out[name] = g.detach(), (dy.double() * (xhat if name == "weight" else 1.0)).abs().sum(rows)
    return y.detach(), exact.detach(), out


def assert_grads_close(got, want):
    """Gradients ``got`` (in the order of ``want``, a dict from :func:`_norm_reference`)."""
    for g, (name, (expected, condition)) in zip(got, want.items()):
        assert_close(g, expected, msg=f"grad {name}", condition=condition)


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_residual", [True, False])
def test_dropout_add_norm(backend, device, is_rms, dtype, p, with_residual):
    shape, n = (2, 5, 40), 40  # 10 rows: each of the backward's 3 programs loops over rows
    x = rand_away_from_zero(shape, dtype, device).requires_grad_()
    r = randn(shape, dtype, device).requires_grad_() if with_residual else None
    w = (1 + 0.1 * randn((n,), dtype, device, seed=4)).requires_grad_()
    b = (0.1 * randn((n,), dtype, device, seed=6)).requires_grad_() if not is_rms else None
    if is_rms:
        y, h = dropout_add_rms_norm(x, r, w, p)
        eps = 1e-6
    else:
        y, h = dropout_add_layer_norm(x, r, w, b, p)
        eps = 1e-5
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == shape
    dy, dh_next = randn(shape, dtype, device, seed=7), randn(shape, dtype, device, seed=8)
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = torch.autograd.grad((y, h), leaves, (dy, dh_next))
    base = r.double() if with_residual else 0.0
    mask = (h.double() - base) != 0 if p else torch.ones(shape, dtype=torch.bool, device=device)
    if p:
        kept = mask.double().mean().item()
        assert abs(kept - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / mask.numel())
    y_ref, h_ref, g_ref = _norm_reference(x, r, w, b, mask, 1 / (1 - p), is_rms, eps, dy, dh_next, h)
    assert_close(h, h_ref)
    assert_close(y, y_ref)  # the norm of the rounded h, as the unfused composition computes it
    assert_grads_close(grads, g_ref)


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_add_norm_without_weight(backend, device, is_rms, dtype):
    # weight=None (and bias=None) as F.rms_norm / F.layer_norm take them: y = xhat, no weight gradient.
    shape = (7, 40)
    x = rand_away_from_zero(shape, dtype, device).requires_grad_()
    r = randn(shape, dtype, device).requires_grad_()
    y, h = dropout_add_rms_norm(x, r, None, 0.3) if is_rms else dropout_add_layer_norm(x, r, None, None, 0.3)
    dy, dh_next = randn(shape, dtype, device, seed=7), randn(shape, dtype, device, seed=8)
    grads = torch.autograd.grad((y, h), (x, r), (dy, dh_next))
    mask = (h.double() - r.double()) != 0
    y_ref, h_ref, g_ref = _norm_reference(x, r, None, None, mask, 1 / 0.7, is_rms, 1e-6 if is_rms else 1e-5, dy,
                                          dh_next, h)  # fmt: skip
    assert_close(h, h_ref)
    assert_close(y, y_ref)
    assert_grads_close(grads, g_ref)


def test_norm_backward_mask_is_forward_mask(backend, device):
    # dx = dh * m: with the gradient only through h (dy = 0), dx = dh_next * mask / (1 - p).
    x = rand_away_from_zero((6, 32), torch.float32, device).requires_grad_()
    r = randn((6, 32), torch.float32, device)
    w = torch.ones(32, device=device)
    y, h = dropout_add_rms_norm(x, r, w, 0.5)
    g = randn((6, 32), torch.float32, device, seed=9)
    (dx,) = torch.autograd.grad(h, x, g)
    assert torch.equal(dx, g * ((h - r) != 0) * 2.0)


def test_norm_module_eval_and_long_rows_fall_back(backend, device, monkeypatch):
    m = DropoutAddLayerNorm(24, p=0.5)
    m.eval()
    x, r = randn((3, 24), torch.float32, device), randn((3, 24), torch.float32, device, seed=3)
    m = m.to(device)
    y, h = m(x, r)
    assert torch.equal(h, x + r)
    assert_close(y, F.layer_norm((x + r).double(), (24,), eps=1e-5))
    rms = DropoutAddRMSNorm(24, p=0.0).to(device)
    if backend == "triton":  # rows longer than the kernel takes: an error when asked for triton
        monkeypatch.setattr("fusedls.backend.triton.tuning.DROPOUT_NORM_MAX_N", {2: 16, 4: 16})
        with pytest.raises(ValueError, match="rows of 24 elements exceed"):
            rms(x)
        monkeypatch.setenv("FUSEDLS_BACKEND", "auto")
        fusedls.set_backend(None)  # ...and the eager backend under 'auto'
    y, h = rms(x)
    assert torch.equal(h, x)
    assert_close(y, F.rms_norm(x.double(), (24,), eps=1e-6))


# -------------------------------------------------------------------------------------- errors


def test_bad_input(backend, device):
    x = torch.randn(4, 8, device=device)
    w = torch.ones(8, device=device)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be in"):
            dropout(x, p)
        with pytest.raises(ValueError, match="p must be in"):
            dropout_add(x, x, p)
        with pytest.raises(ValueError, match="p must be in"):
            dropout_add_rms_norm(x, x, w, p)
    with pytest.raises(TypeError, match="p must be a float"):
        dropout(x, "0.5")
    with pytest.raises(ValueError, match="residual must have"):
        dropout_add(x, torch.randn(4, 9, device=device), 0.1)
    with pytest.raises(ValueError, match="residual must have"):
        dropout_add_layer_norm(x, torch.randn(8, 4, device=device), w, None, 0.1)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        dropout_add_rms_norm(x, x, torch.ones(7, device=device), 0.1)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        dropout_add_layer_norm(x, x, w, torch.ones(2, 4, device=device), 0.1)
    with pytest.raises(ValueError, match=r"bias must have shape"):
        dropout_add(x, x, 0.1, bias=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError):  # torch's own check, in nn.Dropout's constructor
        Dropout(2.0)


# ------------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    x = rand_away_from_zero((8, 32), torch.float32, device).requires_grad_()
    r = randn((8, 32), torch.float32, device)
    w = torch.ones(32, device=device, requires_grad=True)

    def step(x, r, w):
        d = dropout(x, 0.5)
        y, h = dropout_add_rms_norm(d, r, w, 0.25)
        return d, y, h

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.manual_seed(0)
    d, y, h = compiled(x, r, w)
    torch.manual_seed(0)
    d2, _, h2 = compiled(x, r, w)
    assert torch.equal(d, d2) and torch.equal(h, h2)  # reproducible under torch.manual_seed
    d3, _, _ = compiled(x, r, w)
    assert not torch.equal(d != 0, d3 != 0)  # a new mask per call
    m1 = d != 0
    assert torch.equal(d[m1], x.detach()[m1] * 2.0)
    (gx,) = torch.autograd.grad(h.sum(), x)
    m2 = (h - r) != 0
    assert torch.equal(gx, (m1 & m2) * 2.0 * (1 / 0.75))
    assert_close(y, F.rms_norm(h.double(), (32,), w.double(), 1e-6))


def test_compile_inplace(backend, device):
    torch._dynamo.reset()
    x = rand_away_from_zero((4, 16), torch.float32, device).requires_grad_()

    def step(x):
        h = x * 2.0
        return dropout(h, 0.5, inplace=True)

    out = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out.detach() != 0) * 4.0)
