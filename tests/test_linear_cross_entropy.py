"""fusedls.linear_cross_entropy against the materialised float64 composition
``cross_entropy(hidden @ weight.T + bias, ...)`` (fusedls.testing.reference_cross_entropy_options),
on every backend: values and the gradients of hidden, weight and bias."""

import pytest
import torch

import fusedls
from fusedls.ops import linear_cross_entropy as lce
from fusedls.ops import linear_cross_entropy_tokens as lct
from fusedls.ops import linear_cross_entropy_vocab as lcv
from fusedls.ops import linear_cross_entropy_sums as sums
from fusedls.testing import assert_close, reference_cross_entropy_options, rounding_condition

from conftest import AVAILABLE
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_cross_entropy import PROPERTY_SETTINGS, class_ids

V, D = 37, 8  # 37 classes: three kernel chunks of 16 under small_chunks, the last one masked


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    """grad_weight summed in fp32 blocks of 16 classes: three blocks, the last one short."""
    monkeypatch.setattr(sums._WeightGrad, "VOCAB_BLOCK", 16)
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 16)  # strategy="vocab": blocks of 16, 16 and 5 classes


STRATEGIES = pytest.mark.parametrize("strategy", ["tokens", "vocab", "auto"])


def inputs(shape, dtype, device, bias=True, seed=0):
    """hidden (*shape, D), weight (V, D), bias (V,) or None; logits of a few units."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    return tuple(None if v is None else v.to(dtype).to(device) for v in (h, w, b))


def reference(h, w, t, b=None, *, upstream=1.0, class_weight=None, **options):
    """The float64 materialised composition on the same (rounded) values: ``{name: (expected,
    condition)}`` for "loss", "z_loss", "lse" and the gradients of ``(loss * upstream).sum()``,
    "hidden", "weight", "bias" (those that require grad).

    Each condition C bounds its result's error in units of the dtype's unit roundoff u (2^-8 in
    bf16). The logits z are fp32 sums of d products rounded to the dtype, as torch's: each errs by
    at most u Z, Z = |H| @ |W|^T + |b| (the fp32 sum's own error is far smaller). A function Y of
    them that is then rounded errs by u (|Y| + sum_c |dY/dz_c| Z_c): ``rounding_condition``, for
    the loss, z-loss and lse, and for the logits' gradient G, which is rounded to the dtype too.
    The gradients of hidden, weight and bias are sums of products with G, whose terms cancel, so
    their conditions are C_G @ |W|, C_G^T @ |H| and the column sums of C_G.
    """
    hd, wd = h.detach().double(), w.detach().double()
    bd = b.detach().double() if b is not None else None
    z = (hd @ wd.T + (bd if bd is not None else 0.0)).requires_grad_()
    mag = hd.abs() @ wd.abs().T + (bd.abs() if bd is not None else 0.0)
    class_dim_second = z.movedim(-1, 1) if z.dim() > 2 else z
    ref, ref_z, ref_lse = reference_cross_entropy_options(class_dim_second, t, class_weight, **options)
    out = {name: (y.detach(), rounding_condition(y, z, mag))
           for name, y in zip(("loss", "z_loss", "lse"), (ref, ref_z, ref_lse))}  # fmt: skip
    up = torch.as_tensor(upstream, dtype=torch.float64).to(z.device).expand_as(ref)
    (g,) = torch.autograd.grad(ref, z, up, create_graph=True)
    cond = rounding_condition(g, z, mag).reshape(-1, z.shape[-1])
    g, rows = g.detach().reshape(-1, z.shape[-1]), hd.reshape(-1, hd.shape[-1])
    if h.requires_grad:
        out["hidden"] = (g @ wd).view_as(hd), (cond @ wd.abs()).view_as(hd)
    if w.requires_grad:
        out["weight"] = g.T @ rows, cond.T @ rows.abs()
    if b is not None and b.requires_grad:
        out["bias"] = g.sum(0), cond.sum(0)
    return out


def check_linear(h, w, t, b=None, *, upstream=1.0, **kwargs):
    """fusedls vs the float64 materialised composition (:func:`reference`); returns fusedls's result.

    Tolerances: ``tolerance(dtype)`` relative to each result's condition. Its rtol is 2u in half
    precision: the loss, z-loss and lse err by at most u times theirs; a gradient, the product of
    G (u C_G) summed in fp32 and rounded once more, by at most u C_G @ |W| + u |G| @ |W| <= 2u
    C_G @ |W|. A gradient computed in forward and rescaled in backward by an upstream factor other
    than 1 is rounded once more: roundings=2 (3u). In fp32 the table's 1e-5 is room for the fp32
    arithmetic of the kernels (the roundings are 2^-24)."""
    dtype = h.dtype
    upstream = torch.as_tensor(upstream).to(dtype).to(h.device)  # as autograd passes it: rounded
    names = ("z_loss", "softcap", "reduction", "ignore_index", "label_smoothing")
    options = {k: v for k, v in kwargs.items() if k in names}
    want = reference(h, w, t, b, upstream=upstream, class_weight=kwargs.get("weight"), **options)
    ours = [v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None for v in (h, w, b)]
    out = fusedls.linear_cross_entropy(
        ours[0], ours[1], t, linear_bias=ours[2], return_z_loss=True, return_lse=True, **kwargs
    )
    assert out.loss.shape == want["loss"][0].shape and out.loss.dtype == dtype and out.lse.shape == t.shape
    assert_matches(want, dtype, loss=out.loss, z_loss=out.z_loss, lse=out.lse)
    if not out.loss.requires_grad:
        assert not any(v is not None and v.requires_grad for v in (h, w, b))
        return out
    out.loss.backward(upstream.expand_as(out.loss))
    grads = {name: v.grad for name, v in zip(("hidden", "weight", "bias"), ours) if v is not None and v.requires_grad}
    assert all(g.dtype == dtype for g in grads.values())
    assert_matches(want, dtype, 1 if bool((upstream == 1).all()) else 2, **grads)
    return out


def assert_matches(want, dtype, roundings=1, **got):
    """Each result ``got[name]`` against ``want[name] = (expected, condition)`` (:func:`reference`)."""
    for name, value in got.items():
        expected, condition = want[name]
        assert_close(value, expected, dtype, name, roundings, condition)


CONFIGS = [  # (label_smoothing, class weights, z_loss, softcap)
    (0.0, False, 0.0, None),
    (0.1, True, 0.0, None),
    (0.1, False, 0.02, 3.0),
    (0.2, True, 0.05, 5.0),
]


@STRATEGIES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing, weighted, z_loss, softcap", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_parity_fp32(backend, small_chunks, device, reduction, smoothing, weighted, z_loss, softcap, bias, strategy):
    h, w, b = inputs((2, 5), torch.float32, device, bias)
    for v in (h, w, b):
        if v is not None:
            v.requires_grad_()
    t = class_ids((2, 5), V, device, ignored=0.2)
    cw = torch.rand(V, device=device) + 0.1 if weighted else None
    up = torch.randn(2, 5, dtype=torch.float64) if reduction == "none" else 0.6
    check_linear(
        h, w, t, b, upstream=up, reduction=reduction, label_smoothing=smoothing, weight=cw, z_loss=z_loss,
        softcap=softcap, chunk_size=3, strategy=strategy,
    )  # fmt: skip


@STRATEGIES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(backend, small_chunks, device, dtype, reduction, strategy):
    h, w, b = (v.requires_grad_() for v in inputs((13,), dtype, device))
    t = class_ids((13,), V, device)
    check_linear(h, w, t, b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=4,
                 strategy=strategy)  # fmt: skip


@STRATEGIES
def test_float64_runs_eagerly(device, strategy):
    h, w, b = (v.requires_grad_() for v in inputs((6,), torch.float64, device))
    check_linear(h, w, class_ids((6,), V, device), b, label_smoothing=0.1, softcap=2.0, chunk_size=4, strategy=strategy)


@STRATEGIES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, device, reduction, strategy):
    h, w, b = (v.requires_grad_() for v in inputs((4,), torch.float32, device))
    out = check_linear(h, w, torch.full((4,), -100, device=device), b, reduction=reduction, chunk_size=3,
                       strategy=strategy)  # fmt: skip
    assert out.loss.isnan().all() if reduction == "mean" else (out.loss == 0).all()
    assert (w.grad is None or (w.grad == 0).all()) and (out.lse == 0).all()


@STRATEGIES
@pytest.mark.parametrize("wants", ["hidden", "weight", "bias", ""])
def test_some_inputs_without_grad(backend, device, wants, strategy):
    h, w, b = inputs((7,), torch.float32, device)
    for name, v in zip(("hidden", "weight", "bias"), (h, w, b)):
        v.requires_grad_(name == wants)
    for reduction in ("mean", "none"):
        check_linear(h, w, class_ids((7,), V, device), b, reduction=reduction, label_smoothing=0.1, chunk_size=2,
                     strategy=strategy)  # fmt: skip


@STRATEGIES
def test_one_class_gives_exact_zero_gradients(backend, device, strategy):
    # p = 1 for the only class: every gradient is exactly 0, soft cap included, which needs the
    # vocabulary blocks to cap the logits bit for bit as the forward that gave lse did.
    h, w, b = (v.requires_grad_() for v in inputs((5,), torch.float32, device))
    w1, b1 = w.detach()[:1].clone().requires_grad_(), b.detach()[:1].clone().requires_grad_()
    t = torch.zeros(5, dtype=torch.long, device=device)
    fusedls.linear_cross_entropy(h, w1, t, linear_bias=b1, softcap=2.0, strategy=strategy).backward()
    for grad in (h.grad, w1.grad, b1.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("in_blocks", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_strategy_none_grad_hidden(backend, device, monkeypatch, dtype, in_blocks):
    # The backward of "none" sums grad_hidden over the blocks of classes (16, 16, 5) in fp32 row
    # blocks of 16 (small_vocab_blocks: 37 tokens make three, the last one short) when that sum
    # fits a block's bytes; else it recomputes the token chunks for it.
    if not in_blocks:
        monkeypatch.setitem(lcv.VOCAB_BLOCK_BYTES, device, 1)  # blocks keep VOCAB_BLOCK_COLS = 16
    chunks, calls = lce.backward_chunks, []
    monkeypatch.setattr(lce, "backward_chunks", lambda *a, **k: calls.append(1) or chunks(*a, **k))
    h, w, b = (v.requires_grad_() for v in inputs((37,), dtype, device))
    up = torch.randn(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    check_linear(h, w, class_ids((37,), V, device), b, upstream=up, reduction="none", label_smoothing=0.1,
                 chunk_size=8, strategy="vocab")  # fmt: skip
    assert len(calls) == (0 if in_blocks else 1)


def test_vocab_strategy_none_frozen_head(backend, device, monkeypatch):
    # A frozen head (LoRA-style): no block pass at all in backward, grad_hidden from the token
    # chunks recomputed (no fp32 sum over blocks that would run only for it).
    chunks, calls = lce.backward_chunks, []
    monkeypatch.setattr(lce, "backward_chunks", lambda *a, **k: calls.append(1) or chunks(*a, **k))
    monkeypatch.setattr(lcv, "_WeightGrad", None)  # the blocks' fp32 sum of grad_hidden: not built
    h, w, _ = inputs((9,), torch.bfloat16, device, bias=False)
    up = torch.randn(9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_linear(h.requires_grad_(), w, class_ids((9,), V, device), upstream=up, reduction="none",
                 label_smoothing=0.1, chunk_size=4, strategy="vocab")  # fmt: skip
    assert len(calls) == 1


@STRATEGIES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_transposed_head(backend, device, strategy, reduction):
    # A head stored (d, V) and passed transposed: its gradient has the weight's strides, so the
    # vocabulary blocks cannot borrow from it and take own buffers; same values either way.
    h, w, b = inputs((9,), torch.bfloat16, device)
    w_stored = w.t().contiguous().requires_grad_()
    h.requires_grad_()
    t = class_ids((9,), V, device)
    loss = fusedls.linear_cross_entropy(h, w_stored.t(), t, reduction=reduction, label_smoothing=0.1, chunk_size=4,
                                        strategy=strategy)  # fmt: skip
    (loss.sum() if reduction == "none" else loss).backward()
    want = reference(h, w_stored.t(), t, reduction=reduction, label_smoothing=0.1)
    want["weight"] = tuple(v.t() for v in want["weight"])  # of the stored (d, V) head
    assert_matches(want, torch.bfloat16, loss=loss, hidden=h.grad, weight=w_stored.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_strategy_ignored_rows_with_huge_logits(backend, device, reduction):
    # Forward leaves lse = coef = 0 on ignored rows; their exp(logit - lse) must not overflow
    # into inf * 0 = NaN in the vocabulary blocks.
    h, w, b = inputs((5,), torch.float32, device)
    ignored = torch.tensor([1, 3], device=device)
    h[ignored] *= 60.0  # logits of a few hundred on the ignored rows: exp overflows fp32
    h.requires_grad_()
    t = class_ids((5,), V, device).index_fill(0, ignored, -100)
    check_linear(h, w.requires_grad_(), t, b.requires_grad_(), reduction=reduction, chunk_size=2, strategy="vocab")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_strategy_holds_no_weight_sum(backend, device, monkeypatch, reduction):
    # strategy="vocab" writes grad_weight block by block: the fp32 (V, d) sum is never built.
    def refuse(weight):
        raise RuntimeError("strategy='vocab' built the fp32 (V, d) grad-weight sum")

    monkeypatch.setattr(sums, "_WeightGrad", refuse)
    h, w, b = (v.requires_grad_() for v in inputs((9,), torch.bfloat16, device))
    check_linear(h, w, class_ids((9,), V, device), b, reduction=reduction, label_smoothing=0.1, chunk_size=4,
                 strategy="vocab")


def test_vocab_strategy_caps_default_chunks(monkeypatch):
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 8)
    # pass 1's chunk holds no more logits than pass 2's (25, 8) block: 25 * 8 / 37 -> 5 rows
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), None, "vocab") == 5
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), 3, "vocab") == 3
    # in the weight gradient's storage (V D elements) pass 1 takes up to D = 8 rows: 4 chunks of 7
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), None, "vocab", room=V * D * 4) == 7


@pytest.mark.skipif("triton" not in AVAILABLE, reason="runs the triton launchers on meta tensors")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_strategy_pass1_chunks_live_in_the_weight_gradient(monkeypatch, reduction):
    # With a weight gradient, pass 1's token chunks are views of that gradient's storage (pass 2
    # writes it later) and as large as it allows, d = 16 rows here; without one (the forward of
    # "none", which computes no gradient) they are an own buffer capped at a pass-2 block (8 rows).
    # The backward of "none" runs the blocks alone (grad_hidden summed over them): no chunks.
    from fusedls.bench.live_bytes import triton_on_meta

    n, d, v, s = 64, 16, 1024, 2
    monkeypatch.setitem(lcv.VOCAB_BLOCK_BYTES, "meta", n * 128 * s)
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 8192)
    seen, chunks = [], lct.logits_chunks

    def spy(hidden, weight, bias, chunk_rows, storage=None):
        for rows, logits in chunks(hidden, weight, bias, chunk_rows, storage):
            seen.append((logits.shape[0], storage is not None and logits._base is storage))
            yield rows, logits

    monkeypatch.setattr(lct, "logits_chunks", spy)
    h = torch.empty(n, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(v, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with triton_on_meta(), fusedls.use_backend("triton"):
        out = fusedls.linear_cross_entropy(h, w, torch.zeros(n, dtype=torch.long, device="meta"),
                                           reduction=reduction, strategy="vocab")  # fmt: skip
        (out.sum() if reduction == "none" else out).backward()
    assert seen == ([(8, False)] * (n // 8) if reduction == "none" else [(d, True)] * (n // d))


@settings(max_examples=30, **PROPERTY_SETTINGS)
@given(
    n_rows=st.integers(0, 9),
    n_cols=st.integers(1, 40),
    d=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    weighted=st.booleans(),
    bias=st.booleans(),
    ignored=st.floats(0.0, 1.0),
    z_loss=st.sampled_from([0.0, 0.05]),
    softcap=st.sampled_from([None, 2.0]),
    strategy=st.sampled_from(lce.STRATEGIES),
    chunk_size=st.sampled_from([None, 1, 4]),
    seed=st.integers(0, 2**16),
)
# grad_hidden of d = 1 is one sum over 14 classes per row that cancels far below max |grad_hidden|:
# within the bound relative to its condition, not within rtol x the largest element.
@example(n_rows=4, n_cols=14, d=1, dtype=torch.bfloat16, reduction="mean", smoothing=0.1, weighted=False, bias=False,
         ignored=0.75, z_loss=0.05, softcap=2.0, strategy="auto", chunk_size=None, seed=15)  # fmt: skip
def test_property_random_configurations(
    backend, small_chunks, device, n_rows, n_cols, d, dtype, reduction, smoothing, weighted, bias, ignored, z_loss,
    softcap, strategy, chunk_size, seed,
):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    w = (torch.randn(n_cols, d, generator=g, dtype=torch.float64) * 2 / d**0.5).to(dtype).to(device).requires_grad_()
    b = torch.randn(n_cols, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    t = class_ids((n_rows,), n_cols, device, ignored=ignored, seed=seed)
    cw = (torch.rand(n_cols, generator=g) + 0.1).to(device) if weighted else None
    up = torch.randn(n_rows, generator=g, dtype=torch.float64) if reduction == "none" else 0.7
    check_linear(
        h, w, t, b, upstream=up, reduction=reduction, label_smoothing=smoothing, weight=cw, z_loss=z_loss,
        softcap=softcap, chunk_size=chunk_size, strategy=strategy,
    )  # fmt: skip


def _peak_bytes(strategy, reduction, n=64, d=16, v=1024, dtype=torch.bfloat16, device="meta", weight_grad=True):
    from fusedls.bench.live_bytes import LiveBytes, triton_on_meta

    h = torch.randn(n, d, dtype=dtype, device=device).requires_grad_()
    w = torch.randn(v, d, dtype=dtype, device=device).requires_grad_(weight_grad)
    t = torch.zeros(n, dtype=torch.long, device=device)
    with triton_on_meta(), fusedls.use_backend("triton"), LiveBytes() as live:
        out = fusedls.linear_cross_entropy(h, w, t, label_smoothing=0.1, reduction=reduction, strategy=strategy)
        (out.sum() if reduction == "none" else out).backward()
    assert h.grad.shape == h.shape and (w.grad is not None and w.grad.shape == w.shape) == weight_grad
    return live.peak


@pytest.mark.skipif("triton" not in AVAILABLE, reason="counts the triton launchers' allocations")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_strategy_peak_memory(monkeypatch, reduction):
    # strategy="vocab" holds no logits buffer of its own with a weight gradient: the token chunks
    # and the blocks borrow the gradient's storage not written yet; only the last classes take an
    # own buffer of a tail block (1/8 of a block, at least 16 classes). The peak is the two
    # gradients, that tail buffer and a few per-row vectors (for "none" also grad_hidden's fp32
    # sum over the blocks); without a weight gradient, grad_hidden and one full block of
    # VOCAB_BLOCK_BYTES. Counted on meta tensors (the launchers run, the kernels do not;
    # fusedls/bench/memory_model.py's count of this kind matched the H100's max_memory_allocated).
    n, d, v, s = 64, 16, 1024, 2
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 8192)  # the bytes, not the cap, set the block
    monkeypatch.setitem(lcv.VOCAB_BLOCK_BYTES, "meta", n * 128 * s)  # blocks of 128 classes
    monkeypatch.setitem(lcv.VOCAB_BLOCK_BYTES, "cpu", n * 128 * s)
    peak = _peak_bytes("vocab", reduction)
    grads, block, tail = (v + n) * d * s, n * 128 * s, n * 16 * s
    extra = n * d * 4 if reduction == "none" else 0  # none's backward: grad_hidden summed in fp32
    assert grads + tail + extra <= peak <= grads + tail + extra + 128 * n  # per-row vectors: < 16 int64 a row
    frozen = _peak_bytes("vocab", reduction, weight_grad=False)
    assert n * d * s + block <= frozen <= n * d * s + block + 128 * n  # no blocks, no fp32 sum
    # the token strategy holds the fp32 (V, d) grad-weight sum besides grad_weight itself
    assert _peak_bytes("tokens", reduction) >= grads + v * d * 4


@pytest.mark.skipif("triton" not in AVAILABLE, reason="counts the triton launchers' allocations")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_strategy_peak_memory(monkeypatch, reduction):
    # strategy="tokens": the fp32 (V, d) sum, grad_hidden, and either one chunk of logits (while
    # the chunks run) or the rounded grad_weight (after them, once the chunk buffer is freed); on
    # meta, as on CUDA, the chunks after the first add into the fp32 blocks with
    # addmm(out_dtype=float32), with no scratch block.
    n, d, v, s = 64, 16, 1024, 2
    monkeypatch.setattr(sums._WeightGrad, "VOCAB_BLOCK", v)  # one fp32 block: a scratch would be v d 4 bytes
    monkeypatch.setitem(lct.CHUNK_BYTES, "meta", 16 * v * s)  # 4 chunks of 16 tokens
    monkeypatch.setattr(sums._Dispatch, "addmm_out_dtype_works", True)
    fp32_sum, grad_h, chunk, grad_w = v * d * 4, n * d * s, 16 * v * s, v * d * s
    peak = _peak_bytes("tokens", reduction)
    assert fp32_sum + grad_h + max(chunk, grad_w) <= peak <= fp32_sum + grad_h + max(chunk, grad_w) + 128 * n


def test_auto_strategy_keeps_working_memory_under_one_logits_tensor():
    # bf16 head (V, d) = (1000, 64): fp32 sum 256000 bytes; logits 2000 bytes a token
    w = torch.empty(1000, 64, dtype=torch.bfloat16)
    assert lct.pick_strategy("auto", 200, w, 32) == "tokens"  # 256000 + 64000 <= 400000
    assert lct.pick_strategy("auto", 100, w, 32) == "vocab"  # 320000 > 200000
    assert lct.pick_strategy("tokens", 100, w, 32) == "tokens"
    # an fp32 head's sum is its gradient: no extra buffer, the token chunks always fit
    assert lct.pick_strategy("auto", 2, w.float(), 2) == "tokens"


def test_auto_strategy_on_the_llama3_head():
    # the README's claim: token chunks at 16k tokens per call, vocabulary blocks at 4k
    w = torch.empty(128256, 4096, dtype=torch.bfloat16, device="meta")
    for n_rows, want in ((16384, "tokens"), (4096, "vocab")):
        chunk = lct.tokens_per_chunk(n_rows, w.shape[0], 2, torch.device("cuda"), None)
        assert lct.pick_strategy("auto", n_rows, w, chunk) == want


def test_no_grad_mode(backend, device):
    h, w, b = (v.requires_grad_() for v in inputs((5,), torch.float32, device))
    with torch.no_grad():
        out = fusedls.linear_cross_entropy(h, w, class_ids((5,), V, device), linear_bias=b)
    assert not out.requires_grad
    assert_matches(reference(h, w, class_ids((5,), V, device), b), torch.float32, loss=out)


@pytest.mark.parametrize("addmm_works", [True, False])
def test_fp32_product_fallback_off_cuda(monkeypatch, addmm_works):
    # The CUDA path's mm/addmm(out_dtype=float32) raise off CUDA: the fallbacks give the same sum,
    # for the first chunk (written) and the next (added), whichever of them is tried first.
    monkeypatch.setattr(sums._Dispatch, "mm_out_dtype_works", True)  # restored afterwards
    monkeypatch.setattr(sums._Dispatch, "addmm_out_dtype_works", addmm_works)
    g = torch.randn(2, 5, V, dtype=torch.float64).to(torch.bfloat16)
    h = torch.randn(2, 5, D, dtype=torch.float64).to(torch.bfloat16)
    acc = sums._WeightGrad(torch.empty(V, D, dtype=torch.bfloat16))
    for c in range(2):
        for i, block in enumerate(acc.blocks):
            acc._add_fp32_product(block, g[c, :, 16 * i : 16 * i + block.shape[0]], h[c])
        acc.empty = False
    assert not sums._Dispatch.addmm_out_dtype_works
    assert_close(acc.result(), (g.double().transpose(1, 2) @ h.double()).sum(0))


def test_default_chunks_even_out(monkeypatch):
    monkeypatch.setitem(lct.CHUNK_BYTES, "cpu", 10 * V * 4)  # at most 10 rows per chunk
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), None) == 9  # 3 chunks of 9, 9, 7
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), 4) == 4
    assert lct.tokens_per_chunk(0, V, 4, torch.device("cpu"), None) == 1
    # room: the token chunks may take as many bytes as a half-precision head's gradient (20 rows)
    assert lct.tokens_per_chunk(25, V, 4, torch.device("cpu"), None, room=20 * V * 4) == 13
    h, w = torch.empty(25, D, dtype=torch.bfloat16), torch.empty(V, D, dtype=torch.bfloat16)
    monkeypatch.setitem(lct.CHUNK_BYTES, "cpu", 8 * V)  # 4 bf16 rows, 2 fp32; the head's bytes: D = 8 bf16 rows
    assert lct.pass1(h, w, 0, "tokens", True) == (7, None)  # 4 chunks of at most 8 rows
    assert lct.pass1(h, w, 0, "tokens", False) == (4, None)  # no weight gradient, no fp32 sum to round
    assert lct.pass1(h.float(), w.float(), 0, "tokens", True) == (2, None)  # fp32: the sum is the gradient


def test_default_chunking_matches(backend, device, monkeypatch):
    monkeypatch.setitem(lct.CHUNK_BYTES, device, 3 * V * 4)
    h, w, b = (v.requires_grad_() for v in inputs((11,), torch.float32, device))
    check_linear(h, w, class_ids((11,), V, device), b, label_smoothing=0.1)


@STRATEGIES
def test_compile_fullgraph(backend, device, strategy):
    torch._dynamo.reset()
    h, w, b = (v.requires_grad_() for v in inputs((9,), torch.float32, device))
    t = class_ids((9,), V, device)

    def step(h, w, b, t):
        loss, z, lse, accuracy = fusedls.linear_cross_entropy(
            h, w, t, linear_bias=b, label_smoothing=0.1, z_loss=0.01, softcap=4.0, return_z_loss=True, return_lse=True,
            return_accuracy=True, chunk_size=4, strategy=strategy, loss_dtype=torch.float64,
        )  # fmt: skip
        rows = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction="none", chunk_size=4, strategy=strategy)
        return loss + rows.sum(), z, lse, accuracy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss, z, lse, accuracy = compiled(h, w, b, t)
    assert loss.dtype == torch.float64  # loss_dtype
    loss.backward()
    want = reference(h, w, t, b, z_loss=0.01, softcap=4.0, label_smoothing=0.1)
    assert_matches(want, torch.float32, z_loss=z, lse=lse)
    rows = reference(h, w, t, b, reduction="sum")
    total = {k: (want[k][0] + rows[k][0], want[k][1] + rows[k][1]) for k in ("loss", "hidden", "weight", "bias")}
    assert_matches(total, torch.float32, loss=loss, hidden=h.grad, weight=w.grad, bias=b.grad)
    valid = t != -100
    logits = h.detach().double() @ w.detach().double().T + b.detach().double()
    want_accuracy = ((logits.argmax(1) == t) & valid).sum() / valid.sum()
    torch.testing.assert_close(accuracy, want_accuracy.float(), rtol=0, atol=0)  # argmax of the uncapped logits


@pytest.mark.parametrize("strategy", ["tokens", "vocab"])
def test_module(backend, device, strategy):
    h, w, b = (v.requires_grad_() for v in inputs((3, 4), torch.float32, device))
    t = class_ids((3, 4), V, device)
    module = fusedls.nn.HeadCrossEntropyLoss(label_smoothing=0.1, reduction="sum", chunk_size=5, strategy=strategy)
    out = module(h, w, t, b)
    out.backward()
    want = reference(h, w, t, b, label_smoothing=0.1, reduction="sum")
    assert_matches(want, torch.float32, loss=out, hidden=h.grad, weight=w.grad, bias=b.grad)
    assert "label_smoothing=0.1" in repr(module) and f"strategy='{strategy}'" in repr(module)


BAD = [  # (override, error, message): errors are also torch's RuntimeError (test_bad_input)
    (dict(linear_weight=torch.zeros(V, D + 1)), ValueError, "linear_weight must have shape \\(C, d\\) or .* d = input"),
    (dict(linear_weight=torch.zeros(V, D, dtype=torch.float64)), TypeError, "linear_weight must have input's dtype"),
    (dict(linear_bias=torch.zeros(V + 1)), ValueError, "linear_bias must have shape \\(37,\\)"),
    (dict(linear_bias=torch.zeros(V, dtype=torch.float16)), TypeError, "linear_bias must have input's dtype"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target of class ids must have shape \\(5,\\)"),
    (dict(target=torch.zeros(5)), TypeError, "target must hold class ids"),
    (dict(target=torch.zeros(5, V, dtype=torch.long)), TypeError, "holds class probabilities and must be floating"),
    (dict(target=torch.rand(5, V), ignore_index=-100), ValueError, "ignore_index cannot be specified"),
    (dict(target=torch.rand(5, V), return_accuracy=True), ValueError, "return_accuracy needs a target of class ids"),
    (dict(target=torch.rand(5, V), strategy="vocab"), ValueError, "strategy='vocab' takes class-id targets"),
    (dict(input=torch.zeros(5, D, dtype=torch.long)), TypeError, "input must have a floating-point dtype"),
    (dict(input=torch.zeros(())), ValueError, "input must have shape \\(d,\\)"),
    (dict(input=torch.zeros(2, 5, D), linear_weight=torch.zeros(V, 2, D)), ValueError, "needs input of shape \\(N, 8\\)"),
    (dict(linear_weight=torch.zeros(0, D)), ValueError, "0 rows"),
    (dict(linear_weight=torch.zeros(V, D, device="meta")), ValueError, "linear_weight is on meta but input is on"),
    (dict(weight=torch.ones(V - 1)), ValueError, "weight \\(class weights\\) must have shape"),
    (dict(weight=torch.ones(V, dtype=torch.long)), TypeError, "weight must have a floating-point dtype"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing must be in"),
    (dict(strategy="classes"), ValueError, "strategy must be one of"),
    (dict(loss_dtype=torch.long), TypeError, "loss_dtype must be None or a floating-point"),
    (dict(acc_dtype=torch.float16), ValueError, "acc_dtype must be None, torch.float32"),
    (dict(options="chunked"), TypeError, "options must be None or a torch.nn.LinearCrossEntropyOptions"),
]


@pytest.mark.parametrize("override, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(override, error, message):
    args = dict(input=torch.zeros(5, D), linear_weight=torch.zeros(V, D), target=torch.zeros(5, dtype=torch.long))
    args.update(override)
    with pytest.raises(error, match=message) as raised:
        fusedls.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)
    assert isinstance(raised.value, RuntimeError)  # torch raises RuntimeError for each of these


@STRATEGIES
def test_out_of_range_targets(backend, device, strategy):
    h, w, b = inputs((4,), torch.float32, device)
    t = torch.tensor([1, V, -100, 2], device=device)
    if backend == "eager" and device == "cpu":
        with pytest.raises(ValueError, match=f"target contains class id {V}"):
            fusedls.linear_cross_entropy(h, w, t, linear_bias=b)
        return
    h.requires_grad_()
    out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction="none", strategy=strategy)  # kernels: NaN rows, no sync
    assert out[1].isnan() and out[[0, 3]].isfinite().all() and out[2] == 0
    out.backward(torch.ones_like(out))
    assert h.grad[1].isnan().all() and h.grad[[0, 3]].isfinite().all() and (h.grad[2] == 0).all()


def test_no_host_synchronisation_on_gpu(backend, device):
    if device != "cuda":
        pytest.skip("needs a CUDA device")
    h, w, b = (v.requires_grad_() for v in inputs((64,), torch.bfloat16, device))
    t = class_ids((64,), V, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                                chunk_size=16)  # fmt: skip
            out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(w.grad).all()
