"""``linear_cross_entropy(strategy="fused")`` (and ``filter_eps``) on the eager and triton backends
against the float64 composition, at tiles of 16 x 16 (several row and class tiles, blocks of two
class tiles, the last ragged), plus the filter's bound, its memory on meta tensors and the
``auto`` rule."""

import math

import pytest
import torch

import fusedls
from fusedls.backend.eager import linear_cross_entropy as eager_lce
from fusedls.bench.linear_cross_entropy import peaked_inputs
from fusedls.ops import linear_cross_entropy as lce
from fusedls.ops import linear_cross_entropy_fused as lcf
from fusedls.ops import linear_cross_entropy_tokens as lct
from fusedls.ops import linear_cross_entropy_vocab as lcv

from conftest import AVAILABLE
from test_cross_entropy import class_ids
from fusedls.testing import assert_close, tolerance
from test_linear_cross_entropy import assert_matches, check_linear, reference

OP = "linear_cross_entropy"  # the backends' op (conftest's backend fixture)
V, D = 37, 24  # three class tiles of 16 (the last one 5 wide); two steps of BLOCK_K = 16 over d


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16 x 16 tiles (eager and triton alike), BLOCK_K 16, blocks of two class tiles, small row
    chunks and row sums, so every loop of the path runs several times."""
    tiles = {2: (16, 16), 4: (16, 16)}
    monkeypatch.setattr(eager_lce, "TILE", tiles)
    monkeypatch.setattr(eager_lce, "_SWEEP_TILES", 1)
    monkeypatch.setattr(eager_lce, "_ROW_ELEMENTS", 16 * 32)
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 32)
    monkeypatch.setattr(lcf, "_ROW_SUM_ROWS", 8)
    if "triton" in AVAILABLE:
        from fusedls.backend.triton import tuning

        monkeypatch.setattr(tuning, "FUSED_TILE", tiles)
        monkeypatch.setattr(tuning, "FUSED_BLOCK_K", {2: 16, 4: 16})
        monkeypatch.setattr(tuning, "FUSED_BLOCK_D", {2: 16, 4: 16})


def inputs(n, dtype, device, bias=True, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    return tuple(None if x is None else x.to(dtype).to(device).requires_grad_() for x in (h, w, b))


CONFIGS = [  # (label_smoothing, class weights, z_loss, softcap)
    (0.0, False, 0.0, None),
    (0.1, True, 0.0, None),
    (0.1, False, 0.02, 3.0),
    (0.2, True, 0.05, 5.0),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, weighted, z_loss, softcap", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_parity_fp32(backend, device, reduction, smoothing, weighted, z_loss, softcap, bias):
    h, w, b = inputs(37, torch.float32, device, bias)
    t = class_ids((37,), V, device, ignored=0.2)
    cw = torch.rand(V, generator=torch.Generator().manual_seed(2)).add(0.1).to(device) if weighted else None
    up = torch.randn(37, dtype=torch.float64) if reduction == "none" else 0.6
    check_linear(h, w, t, b, upstream=up, reduction=reduction, label_smoothing=smoothing, weight=cw,
                 z_loss=z_loss, softcap=softcap, strategy="fused")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("filter_eps", [None, 1e-30])
def test_half_precision(backend, device, dtype, reduction, filter_eps):
    h, w, b = inputs(41, dtype, device)
    check_linear(h, w, class_ids((41,), V, device), b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                 strategy="fused", filter_eps=filter_eps)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_filter_with_a_tiny_eps_is_exact(backend, device, reduction):
    # filter_eps must be > 0; at 1e-30 no tile of the sparse part is skipped, and the gradients
    # (sparse products + rank-one smoothing terms) match the float64 truth like the dense path
    h, w, b = inputs(37, torch.float32, device)
    cw = torch.rand(V, generator=torch.Generator().manual_seed(2)).add(0.1).to(device)
    up = torch.randn(37, dtype=torch.float64) if reduction == "none" else 0.6
    check_linear(h, w, class_ids((37,), V, device, ignored=0.2), b, upstream=up, reduction=reduction,
                 label_smoothing=0.2, weight=cw, z_loss=0.01, strategy="fused",
                 filter_eps=1e-30)  # fmt: skip


@pytest.mark.parametrize("d, v", [(7, 16), (33, 50), (16, 100)])
def test_shapes(backend, device, d, v):
    # d below, between and at multiples of BLOCK_K; one class tile, a ragged one, several blocks
    h, w, b = inputs(19, torch.float32, device, d=d, v=v)
    check_linear(h, w, class_ids((19,), v, device), b, label_smoothing=0.1, strategy="fused")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty_batch(backend, device, reduction):
    h, w, b = inputs(5, torch.float32, device)
    out = check_linear(h, w, torch.full((5,), -100, device=device), b, reduction=reduction, strategy="fused",
                       filter_eps=1e-3)  # fmt: skip
    assert out.loss.isnan().all() if reduction == "mean" else (out.loss == 0).all()  # gradients: exactly 0 (close)
    h0, w0, b0 = inputs(0, torch.float32, device)
    check_linear(h0, w0, torch.zeros(0, dtype=torch.long, device=device), b0, reduction=reduction, strategy="fused")


def test_out_of_range_targets(backend, device):
    h, w, b = inputs(4, torch.float32, device)
    t = torch.tensor([1, V, -100, 2], device=device)
    if backend == "eager" and device == "cpu":
        with pytest.raises(ValueError, match=f"target contains class id {V}"):
            fusedls.linear_cross_entropy(h, w, t, linear_bias=b, strategy="fused")
        return
    for filter_eps in (None, 1e-3):
        h.grad = None
        out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction="none", strategy="fused", filter_eps=filter_eps)
        assert out[1].isnan() and out[[0, 3]].isfinite().all() and out[2] == 0
        out.backward(torch.ones_like(out))
        assert h.grad[1].isnan().all() and h.grad[[0, 3]].isfinite().all() and (h.grad[2] == 0).all()


def test_some_inputs_without_grad(backend, device):
    for wants in ("hidden", "weight", "bias"):
        h, w, b = inputs(9, torch.float32, device)
        for name, x in zip(("hidden", "weight", "bias"), (h, w, b)):
            x.requires_grad_(name == wants)
        for reduction, filter_eps in (("mean", None), ("none", 1e-4)):
            check_linear(h, w, class_ids((9,), V, device), b, reduction=reduction, label_smoothing=0.1,
                         strategy="fused", filter_eps=filter_eps)  # fmt: skip


def test_deterministic(backend, device):
    # no atomics: the same bits every run
    results = []
    for _ in range(2):
        h, w, b = inputs(37, torch.bfloat16, device)
        loss = fusedls.linear_cross_entropy(h, w, class_ids((37,), V, device), linear_bias=b, label_smoothing=0.1,
                                            strategy="fused", filter_eps=1e-4)  # fmt: skip
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------------- filtering


def _spy_kept(monkeypatch):
    seen = []
    kept_tiles = lcf._kept_tiles

    def spy(tile_max, lse, coef, valid, y, start, width, filter_eps, tile):
        kept = kept_tiles(tile_max, lse, coef, valid, y, start, width, filter_eps, tile)
        seen.append((start, width, kept.clone()))
        return kept

    monkeypatch.setattr(lcf, "_kept_tiles", spy)
    return seen


def _reference_filtered(h, w, b, t, cw, smoothing, z_loss, reduction, up, seen, eps):
    """float64 loss gradients with the sparse part A of the skipped tiles left out (the uniform
    smoothing term kept everywhere), and the largest |A| over the skipped elements."""
    hd, wd = h.detach().double(), w.detach().double()
    x = hd @ wd.T + (b.detach().double() if b is not None else 0.0)
    n, v = x.shape
    valid = t != -100
    y = t.clamp_min(0)
    wc = cw.double() if cw is not None else torch.ones(v, dtype=torch.float64)
    keep, spread = 1.0 - smoothing, smoothing / v
    lse = torch.logsumexp(x, 1)
    coef = keep * wc[y] + spread * wc.sum() + 2 * z_loss * lse
    a = coef[:, None] * torch.softmax(x, 1)
    a[torch.arange(n), y] -= keep * wc[y]
    denom = (wc[y] * valid).sum()
    scale = torch.as_tensor(up, dtype=torch.float64).expand(n) / (denom if reduction == "mean" else 1.0)
    scale = torch.where(valid, scale, 0.0)
    skipped = torch.zeros(n, v, dtype=torch.bool)
    for start, width, kept in seen:
        mask = kept.cpu().repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :width]
        skipped[:, start : start + width] = ~mask
    biggest = float(a.abs().masked_fill(~skipped | ~valid[:, None], 0.0).max())
    g = scale[:, None] * (a.masked_fill(skipped, 0.0) - spread * wc[None, :])
    rank_one = scale.abs()[:, None] * spread * wc[None, :]  # the magnitude of the uniform term, per logit
    return g @ wd, g.T @ hd, g.sum(0), biggest, skipped, rank_one


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted, z_loss", [(False, 0.0), (True, 0.02)])
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_filter_is_exact_outside_the_skipped_tiles(backend, device, monkeypatch, reduction, weighted, z_loss, eps):
    # On peaked logits: the skipped tiles' sparse part is below eps everywhere, and the gradients
    # equal the float64 gradients with exactly that part left out (the smoothing term, rank-one,
    # kept whole), to fp32 rounding.
    seen = _spy_kept(monkeypatch)
    v = 200  # 13 class tiles, the last one ragged
    h, w, t = peaked_inputs(45, v, 256, torch.float32, device, seed=3)
    h.requires_grad_(), w.requires_grad_()
    b = torch.randn(v, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_()
    t[::7] = -100
    cw = torch.rand(v, generator=torch.Generator().manual_seed(6)).add(0.5).to(device) if weighted else None
    up = torch.randn(45, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    loss = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, weight=cw,
                                        z_loss=z_loss, strategy="fused", filter_eps=eps)  # fmt: skip
    loss.backward(up.to(torch.float32))
    grad_h, grad_w, grad_b, biggest, skipped, rank_one = _reference_filtered(h, w, b, t.cpu(), cw, 0.1, z_loss, reduction,
                                                                   up, seen, eps)  # fmt: skip
    assert 0.3 < skipped.float().mean() < 0.95, float(skipped.float().mean())  # some tiles skipped, not all
    assert biggest < eps
    # Each gradient within fp32's tolerance relative to its condition: the unfiltered gradient's
    # (reference; the filter drops terms of the same sums), plus the split's own: the sparse part A
    # and the rank-one term R are summed apart, |A| + |R| <= |G| + 2|R| per logit, so the products
    # with |W| and |h| of 2|R| are added to the conditions of grad_hidden, grad_weight and grad_bias.
    # The table's fp32 rtol is room for one fp32 accumulation of each product; here each gradient
    # is two (the filtered GEMM's and the rank-one term's, summed apart), so the bound is doubled;
    # and the logits feeding the filter's tiles are fp32 sums of d = 256 products, which err by up
    # to d u |h| @ |W|^T (u = 2^-24), 1.5x the table's rtol: the bound takes that factor too (worst
    # seen on the Triton kernels: 1.33x the single bound with one numpy, 2.34x with another, whose
    # matmul sums in another order; the eager twin stays within the single bound).
    gemm = max(1.0, h.shape[1] * 2.0**-24 / tolerance(torch.float32)["rtol"])
    cond = reference(h, w, t, b, upstream=up, class_weight=cw, label_smoothing=0.1, z_loss=z_loss, reduction=reduction)
    extra = {"hidden": 2 * rank_one @ w.detach().double().abs().cpu(),
             "weight": 2 * rank_one.T @ h.detach().double().abs().cpu(), "bias": 2 * rank_one.sum(0)}  # fmt: skip
    for got, want, what in ((h.grad, grad_h, "hidden"), (w.grad, grad_w, "weight"), (b.grad, grad_b, "bias")):
        assert_close(got.cpu(), want, torch.float32, f"grad {what}", condition=2 * gemm * (cond[what][1].cpu() + extra[what]))


def test_filter_never_skips_a_target_tile(backend, device, monkeypatch):
    # filter_eps = 1: every softmax element is below it, so only the tiles holding targets remain
    seen = _spy_kept(monkeypatch)
    h, w, b = inputs(40, torch.float32, device)
    t = class_ids((40,), V, device, ignored=0.1)
    fusedls.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1, strategy="fused", filter_eps=1.0).backward()
    for start, width, kept in seen:
        want = torch.zeros_like(kept)
        here = (t >= start) & (t < start + width)
        rows = torch.arange(40, device=device)[here] // 16
        want[rows, (t[here] - start) // 16] = True
        assert torch.equal(kept, want)


def test_filter_checks():
    h, w, t = torch.zeros(3, D), torch.zeros(V, D), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="filter_eps cannot be combined with softcap"):
        fusedls.linear_cross_entropy(h, w, t, softcap=5.0, filter_eps=1e-5)
    with pytest.raises(ValueError, match="filter_eps needs strategy='fused'"):
        fusedls.linear_cross_entropy(h, w, t, strategy="tokens", filter_eps=1e-5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="filter_eps must be a finite number > 0"):
            fusedls.linear_cross_entropy(h, w, t, filter_eps=bad)
    with pytest.raises(TypeError, match="filter_eps must be a float"):
        fusedls.linear_cross_entropy(h, w, t, filter_eps="1e-5")


def test_filter_eps_selects_the_fused_path(monkeypatch):
    calls = []
    fwd = lcf.linear_cross_entropy_fused_fwd
    monkeypatch.setattr(lcf, "linear_cross_entropy_fused_fwd", lambda *a: calls.append(1) or fwd(*a))
    h, w, b = inputs(5, torch.float32, "cpu")
    fusedls.linear_cross_entropy(h, w, class_ids((5,), V, "cpu"), linear_bias=b, filter_eps=1e-6)
    assert calls


def test_round_up_bf16_bits():
    x = torch.cat([torch.randn(4000) * 10 ** torch.randint(-30, 30, (4000,)).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 3.4e38, 1e-45])])  # fmt: skip
    up = eager_lce.round_up_bf16_bits(x).view(torch.bfloat16).float()
    assert (up >= x).all()
    step = torch.where(up > 0, 1 << 16, -(1 << 16)).to(torch.int32)
    below = (up.view(torch.int32) - step).view(torch.float32)  # the next bf16 below
    assert ((below < x) | (up == 0) | up.isinf()).all()  # the smallest bf16 >= x
    d = x[x.isfinite()].double() * (1 + 1e-12)
    assert (eager_lce.round_up_bf16_bits(d).view(torch.bfloat16).double() >= d).all()  # fp64 too


def test_tile_max_bounds_each_tile(backend, device):
    # the backend's tile maxima against float64: upper bounds, within two bf16 ulps
    h, w, b = inputs(37, torch.float32, device)
    impl = fusedls.backend.registry.implementation("linear_cross_entropy", backend)
    tile_max = torch.empty(37, 3, dtype=torch.int16, device=device)
    for softcap in (None, 2.0):
        impl.row_statistics(h.detach(), w.detach(), b.detach(), None, softcap, False, tile_max)
        x = h.detach().double() @ w.detach().double().T + b.detach().double()
        z = x if softcap is None else softcap * torch.tanh(x / softcap)
        true = torch.nn.functional.pad(z, (0, 11), value=float("-inf")).view(37, 3, 16).amax(2)
        bound = tile_max.view(torch.bfloat16).double()
        assert (bound >= true - 1e-6 * true.abs()).all()
        assert (bound <= true + 2 ** -6 * true.abs() + 1e-30).all()


# ------------------------------------------------------------------------------ memory and choice


def _peak(n, d, v, filter_eps=None, reduction="mean"):
    from fusedls.bench.live_bytes import LiveBytes, triton_on_meta

    h = torch.empty(n, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(v, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    t = torch.zeros(n, dtype=torch.long, device="meta")
    with triton_on_meta(), fusedls.use_backend("triton"), LiveBytes() as live:
        out = fusedls.linear_cross_entropy(h, w, t, label_smoothing=0.1, reduction=reduction, strategy="fused",
                                           filter_eps=filter_eps)  # fmt: skip
        (out.sum() if reduction == "none" else out).backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape
    return live.peak


@pytest.mark.skipif("triton" not in AVAILABLE, reason="counts the triton launchers' allocations")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory(monkeypatch, reduction):
    # Counted on meta tensors: the two gradients, grad_hidden's fp32 sum over the blocks and the
    # last blocks' own buffer (the others live in grad_weight's rows not written yet), plus
    # per-row vectors; the filter adds its tile maxima (2 bytes per row and class tile). No
    # (N, V) logits, no fp32 (V, d) sum.
    n, d, v, s = 64, 16, 1024, 2
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 8192)
    monkeypatch.setitem(lcv.VOCAB_BLOCK_BYTES, "meta", n * 128 * s)  # blocks of 128 classes
    grads, fp32_sum, tail = (v + n) * d * s, n * d * 4, n * 16 * s
    peak = _peak(n, d, v, reduction=reduction)
    assert grads + fp32_sum + tail <= peak <= grads + fp32_sum + tail + 160 * n
    tile_max = n * (v // 16) * 2
    filtered = _peak(n, d, v, filter_eps=1e-5, reduction=reduction)
    assert grads + fp32_sum + tail + tile_max <= filtered <= grads + fp32_sum + tail + tile_max + 200 * n
    assert peak < n * v * s + grads  # less than one (N, V) logits tensor beside the gradients


def test_eager_tiles_are_the_triton_tiles():
    pytest.importorskip("triton")
    from fusedls.backend.triton import linear_cross_entropy as triton_lce
    from fusedls.backend.triton import tuning

    assert eager_lce.TILE == tuning.FUSED_TILE  # (16, 16) here, set together by small_tiles
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert eager_lce.tile_shape(dtype) == triton_lce.tile_shape(dtype)


def test_auto_takes_fused_only_once_measured(monkeypatch):
    w = torch.empty(128256, 4096, dtype=torch.bfloat16, device="meta")
    for n_rows, chunks_choice in ((16384, "tokens"), (4096, "vocab")):
        chunk = lct.tokens_per_chunk(n_rows, w.shape[0], 2, torch.device("cuda"), None)
        assert lct.pick_strategy("auto", n_rows, w, chunk) == chunks_choice  # unmeasured: as before
        monkeypatch.setattr(lcf, "FUSED_TIME_VS_TOKENS", 0.98)  # faster than the chunks, less memory
        assert lct.pick_strategy("auto", n_rows, w, chunk) == "fused"
        monkeypatch.setattr(lcf, "FUSED_TIME_VS_TOKENS", 1.02)  # a tie within TIME_TIE: less memory wins
        assert lct.pick_strategy("auto", n_rows, w, chunk) == "fused"
        monkeypatch.setattr(lcf, "FUSED_TIME_VS_TOKENS", 1.2)  # slower than the chunks, faster than vocab
        assert lct.pick_strategy("auto", n_rows, w, chunk) == ("tokens" if chunks_choice == "tokens" else "fused")
        monkeypatch.setattr(lcf, "FUSED_TIME_VS_TOKENS", None)
    assert "fused" in lce.STRATEGIES


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    h, w, b = inputs(9, torch.float32, device)
    t = class_ids((9,), V, device)

    def step(h, w, b, t):
        return fusedls.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1, strategy="fused", filter_eps=1e-30)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled(h, w, b, t).backward()
    assert_matches(reference(h, w, t, b, label_smoothing=0.1), torch.float32, hidden=h.grad, weight=w.grad, bias=b.grad)
    assert math.isfinite(float(w.grad.abs().max()))


def test_fused_refuses_what_it_does_not_compute():
    # probability targets, a K-dimensional weight and the token accuracy: a clear ValueError
    h, w = torch.randn(4, D), torch.randn(V, D)
    probs = torch.softmax(torch.randn(4, V), 1)
    for strategy, filter_eps in (("fused", None), ("auto", 1e-5)):
        with pytest.raises(ValueError, match="class-id targets"):
            fusedls.linear_cross_entropy(h, w, probs, strategy=strategy, filter_eps=filter_eps)
        with pytest.raises(ValueError, match=r"\(C, d\) linear_weight"):
            fusedls.linear_cross_entropy(h, torch.randn(V, 2, D), torch.zeros(4, 2, dtype=torch.long),
                                         strategy=strategy, filter_eps=filter_eps)  # fmt: skip
        with pytest.raises(ValueError, match="return_accuracy"):
            fusedls.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), return_accuracy=True,
                                         strategy=strategy, filter_eps=filter_eps)  # fmt: skip


def test_modules_take_filter_eps(monkeypatch):
    calls = []
    fwd = lcf.linear_cross_entropy_fused_fwd
    monkeypatch.setattr(lcf, "linear_cross_entropy_fused_fwd", lambda *a: calls.append(a[11]) or fwd(*a))
    h, w, b = inputs(5, torch.float32, "cpu")
    t = class_ids((5,), V, "cpu")
    want = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1, filter_eps=1e-3)
    got = fusedls.nn.HeadCrossEntropyLoss(label_smoothing=0.1, filter_eps=1e-3)(h, w, t, b)
    assert calls == [1e-3, 1e-3] and torch.equal(got, want)
