"""linear_cross_entropy's torch 2.13 API and fusedls's options on it, on every backend: the
transition from fusedls's earlier names, probability targets and K-dimensional weights through
the chunks, torch's LinearCrossEntropyOptions, the token accuracy, loss_dtype, the weight
gradient summed in place (acc_dtype), and the modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedls
from fusedls.ops import linear_cross_entropy_args as lca
from fusedls.ops import linear_cross_entropy_sums as sums
from fusedls.ops import linear_cross_entropy_tokens as lct
from fusedls.ops import linear_cross_entropy_vocab as lcv
from fusedls.testing import assert_close, rounding_condition, tolerance

from conftest import AVAILABLE
from test_cross_entropy import class_ids
from test_linear_cross_entropy import D, V, inputs

HAS_TORCH_API = hasattr(F, "linear_cross_entropy")
needs_torch_api = pytest.mark.skipif(not HAS_TORCH_API, reason="torch has no F.linear_cross_entropy")
STRATEGIES = pytest.mark.parametrize("strategy", ["tokens", "vocab"])
OP = "linear_cross_entropy"  # the backend fixture runs these on every backend that has it


def test_a_fourth_positional_argument_is_refused():
    h, w, b = inputs((5,), torch.float32, "cpu")
    with pytest.raises(TypeError, match="takes 3 positional arguments .* pass the head's bias as linear_bias="):
        fusedls.linear_cross_entropy(h, w, class_ids((5,), V, "cpu"), b)


def test_deprecated_names_warn_and_mean_the_same():
    h, w, b = inputs((5,), torch.float32, "cpu")
    t, cw = class_ids((5,), V, "cpu"), torch.rand(V) + 0.5
    want = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, weight=cw, label_smoothing=0.1)
    with pytest.warns(DeprecationWarning, match="bias= is deprecated, use torch's name linear_bias="):
        with pytest.warns(DeprecationWarning, match="class_weight= is deprecated, use torch's name weight="):
            got = fusedls.linear_cross_entropy(h, w, t, bias=b, class_weight=cw, label_smoothing=0.1)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="got both bias= and linear_bias="):
            fusedls.linear_cross_entropy(h, w, t, bias=b, linear_bias=b)
    with pytest.raises(TypeError, match="unexpected keyword argument 'hidden'"):
        fusedls.linear_cross_entropy(h, w, t, hidden=h)


def reference(h, w, b, t, upstream=None, **kwargs):
    """torch's reference path, F.cross_entropy(F.linear(...).reshape(...)), in float64 on the same
    (rounded) values: ``{name: (expected, condition)}`` for "loss" and the gradients of
    ``(loss * upstream).sum()``: "input", "weight", "bias" and a probability target's "target".

    The conditions are those of test_linear_cross_entropy.reference: the logits of a head of
    K positions are laid out as (rows x positions, C), one row per (token, position), so that each
    row's results are functions of that row's logits (``rounding_condition``); the logits err by u
    ``|h| @ |W|^T + |b|``, and the input, weight and bias gradients, sums of products with the
    logits' gradient G, have the conditions ``C_G @ |W|``, ``C_G^T @ |h|`` and ``C_G``'s sums."""
    hd = h.detach().double().reshape(-1, h.shape[-1])
    wd = w.detach().double().reshape(-1, w.shape[-1])
    bd = b.detach().double().reshape(-1) if b is not None else 0.0
    n, c, k = hd.shape[0], w.shape[0], wd.shape[0] // w.shape[0]

    def rows(flat):  # (n, c * k) in F.linear's layout -> (n * k, c)
        return flat.reshape(n, c, k).transpose(1, 2).reshape(n * k, c)

    z = rows(hd @ wd.T + bd).requires_grad_()
    mag = rows(hd.abs() @ wd.abs().T + (bd.abs() if b is not None else 0.0))
    prob = t.is_floating_point()
    td = rows(t.detach().double().reshape(n, -1)).requires_grad_(t.requires_grad) if prob else t.reshape(-1)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].double()
    loss = F.cross_entropy(z, td, **kwargs)
    out = {"loss": (loss.detach(), rounding_condition(loss, z, mag))}
    if kwargs.get("reduction") == "none":  # torch's shape: the target's batch dims
        shape = t.shape if not prob else (*t.shape[:1], *t.shape[2:]) if t.dim() > 1 else ()
        out["loss"] = tuple(v.reshape(shape) for v in out["loss"])
    up = torch.ones_like(loss) if upstream is None else upstream.double().reshape(loss.shape)
    want = [z] + ([td] if prob and t.requires_grad else [])
    grads = torch.autograd.grad(loss, want, up, create_graph=True)
    g, cond = grads[0], rounding_condition(grads[0], z, mag)
    if len(grads) > 1:
        out["target"] = tuple(v.reshape(n, k, c).transpose(1, 2).reshape(t.shape)
                              for v in (grads[1].detach(), rounding_condition(grads[1], z, mag)))  # fmt: skip

    def flat(v):  # (n * k, c) -> (n, c * k)
        return v.detach().reshape(n, k, c).transpose(1, 2).reshape(n, c * k)

    g, cond = flat(g), flat(cond)
    out["input"] = (g @ wd).reshape(h.shape), (cond @ wd.abs()).reshape(h.shape)
    out["weight"] = (g.T @ hd).reshape(w.shape), (cond.T @ hd.abs()).reshape(w.shape)
    if b is not None:
        out["bias"] = g.sum(0).reshape(b.shape), cond.sum(0).reshape(b.shape)
    return out


def assert_matches(want, dtype, **got):
    """Each result ``got[name]`` against ``want[name] = (expected, condition)``, in ``dtype``'s tolerance."""
    for name, value in got.items():
        assert_close(value, want[name][0], dtype, name, condition=want[name][1])


@STRATEGIES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_dimensional_weight_through_the_chunks(backend, small_chunks, device, strategy, reduction):
    # (C, 2, 3, d) weight: six heads over the same rows, each in chunks of 3 tokens; the mean shares
    # torch's denominator (the summed class weights of every (row, position) not ignored).
    g = torch.Generator().manual_seed(5)
    h = torch.randn(7, D, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, 2, 3, D, generator=g) / D**0.5).to(device).requires_grad_()
    b = torch.randn(V, 2, 3, generator=g).to(device).requires_grad_()
    t = class_ids((7, 2, 3), V, device, ignored=0.2)
    cw = torch.rand(V, generator=g).to(device) + 0.5
    out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1,
                                       chunk_size=3, strategy=strategy, return_accuracy=True)  # fmt: skip
    up = torch.randn(out.loss.shape, generator=g).to(device)
    want = reference(h, w, b, t, up, weight=cw, reduction=reduction, label_smoothing=0.1)
    out.loss.backward(up)
    assert_matches(want, torch.float32, loss=out.loss, input=h.grad, weight=w.grad, bias=b.grad)
    logits = (h.double() @ w.double().reshape(-1, D).T + b.double().reshape(-1)).reshape(7, V, 2, 3)
    right = ((logits.argmax(1) == t) & (t != -100)).float()
    want = right if reduction == "none" else right.sum() if reduction == "sum" else right.sum() / (t != -100).sum()
    torch.testing.assert_close(out.accuracy, want, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probability_targets_through_the_chunks(backend, small_chunks, device, reduction, dtype):
    # Probability targets run the token chunks (3 tokens each) and recompute them in backward for
    # the target's gradient; torch's promotion gives an fp32 loss for a bf16 head and fp32 targets.
    h, w, b = (v.requires_grad_() for v in inputs((10,), dtype, device))
    t = torch.rand(10, V, generator=torch.Generator().manual_seed(2)).to(device).softmax(-1).requires_grad_()
    out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, z_loss=0.0,
                                       chunk_size=3)  # fmt: skip
    assert out.dtype == torch.float32
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    want = reference(h, w, b, t, up, reduction=reduction, label_smoothing=0.1)
    out.backward(up)
    # every result errs by the head's dtype's rounding of the logits (the fp32 loss and target gradient too)
    assert_matches(want, dtype, loss=out, input=h.grad, weight=w.grad, bias=b.grad, target=t.grad)


@STRATEGIES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accuracy_through_the_chunks_and_blocks(backend, small_chunks, device, strategy, reduction):
    # The argmax is found by the cross-entropy forward of each token chunk (pass 1 of "vocab" too),
    # over every class; ignored rows count for nothing; the loss and gradients are unchanged.
    h, w, b = inputs((13,), torch.float32, device)
    t = class_ids((13,), V, device, ignored=0.3)
    logits = h.double() @ w.double().T + b.double()
    t[:3] = logits[:3].argmax(1)  # a few rows right
    kwargs = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=4, strategy=strategy)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = fusedls.linear_cross_entropy(ha, w, t, return_accuracy=True, **kwargs)
    plain = fusedls.linear_cross_entropy(hb, w, t, **kwargs)
    right = ((logits.argmax(1) == t) & (t != -100)).float()
    want = right if reduction == "none" else right.sum() / (t != -100).sum()
    torch.testing.assert_close(out.accuracy, want, rtol=0, atol=0)
    assert out.z_loss is None and out.lse is None and torch.equal(out.loss, plain)
    out.loss.sum().backward()
    plain.sum().backward()
    assert torch.equal(ha.grad, hb.grad)


def test_accuracy_of_a_bf16_head_picks_a_maximal_logit(backend, device):
    # bf16 logits tie where float64 ones do not: the argmax is a class whose float64 logit is the
    # row's maximum within the logits' bf16 rounding.
    h, w, _ = inputs((64,), torch.bfloat16, device, bias=False)
    t = class_ids((64,), V, device, ignored=0.0)
    logits = h.double() @ w.double().T
    out = fusedls.linear_cross_entropy(h, w, t, reduction="none", return_accuracy=True, chunk_size=16)
    picked = logits.gather(1, t[:, None]).squeeze(1)
    best = logits.max(1).values
    assert ((out.accuracy == 1) <= (picked >= best - 2**-7 * best.abs())).all()  # right: the target is maximal
    assert ((out.accuracy == 0) <= (picked < best + 2**-7 * best.abs())).all()  # wrong: it is not above the max


def test_loss_dtype(backend, device):
    # A bf16 head's loss in fp32: the value the bf16 loss is rounded from; same gradients.
    h, w, b = inputs((9,), torch.bfloat16, device)
    t = class_ids((9,), V, device)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss32 = fusedls.linear_cross_entropy(ha, w, t, linear_bias=b, label_smoothing=0.1, loss_dtype=torch.float32)
    loss16 = fusedls.linear_cross_entropy(hb, w, t, linear_bias=b, label_smoothing=0.1)
    assert loss32.dtype == torch.float32 and loss16.dtype == torch.bfloat16
    assert torch.equal(loss32.to(torch.bfloat16), loss16) and not torch.equal(loss32, loss16.float())
    loss32.backward()
    loss16.backward()
    assert torch.equal(ha.grad, hb.grad)


@needs_torch_api
def test_options_fields():
    O = torch.nn.LinearCrossEntropyOptions  # noqa: E741, N806
    read = lca.read_options
    n, d, v, bf16 = 100, 8, 64, torch.bfloat16
    assert read(None, n, d, v, None, None, bf16) == (None, False, False)
    assert read(O(), n, d, v, None, None, bf16) == (None, False, False)  # auto: fusedls's chunks, exact sums
    assert read(O(batch_chunk_size=7), n, d, v, None, None, bf16)[0] == 7
    assert read(O(batch_chunk_size=7), n, d, v, 7, None, bf16)[0] == 7
    with pytest.raises(ValueError, match="chunk_size=5 and options give 7"):
        read(O(batch_chunk_size=7), n, d, v, 5, None, bf16)
    # torch's aspect ratio: next_pow2(ceil(100 / ceil(64 / 8))) = 16, halved by ":2"
    assert read(O(chunking_method="aspect_ratio"), n, d, v, None, None, bf16)[0] == 16
    assert read(O(chunking_method="aspect_ratio:2"), n, d, v, None, None, bf16)[0] == 8
    with pytest.raises(ValueError, match="different chunk sizes"):
        read(O(chunking_method="aspect_ratio", batch_chunk_size=3), n, d, v, None, None, bf16)
    assert read(O(chunking_method=None), n, d, v, None, None, bf16)[0] == n  # one chunk, as torch
    assert read(O(acc_policy="compact"), n, d, v, None, None, bf16)[1]  # no scratch: summed in place
    assert not read(O(acc_policy="compact"), n, d, v, None, None, torch.float32)[1]  # fp32: nothing to save
    assert read(O(acc_dtype=bf16), n, d, v, None, None, bf16)[1]
    assert not read(O(acc_dtype=torch.float32), n, d, v, None, None, bf16)[1]
    assert read(None, n, d, v, None, bf16, bf16)[1]
    with pytest.raises(ValueError, match="acc_dtype=torch.bfloat16 and options give torch.float32"):
        read(O(acc_dtype=torch.float32), n, d, v, None, bf16, bf16)
    assert read(O(allow_retain_graph=True), n, d, v, None, None, bf16)[2]


@needs_torch_api
@pytest.mark.parametrize("retain", [False, True])
def test_allow_retain_graph(backend, device, retain):
    h, w, b = (v.requires_grad_() for v in inputs((6,), torch.float32, device))
    options = torch.nn.LinearCrossEntropyOptions(allow_retain_graph=retain, batch_chunk_size=4)
    loss = fusedls.linear_cross_entropy(h, w, class_ids((6,), V, device), linear_bias=b, options=options)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    if not retain:  # torch's behaviour too: the forward's gradients were consumed in place
        with pytest.raises(RuntimeError):
            loss.backward()
        return
    (loss * 0.5).backward()
    torch.testing.assert_close(h.grad, first * 1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_summed_in_place(backend, small_chunks, device, monkeypatch, dtype):
    # acc_dtype = the weight's dtype: 4 chunks of 4 tokens each add their product into the
    # gradient's own storage (no fp32 (V, d) sum is built), rounding the running sum once per
    # chunk. Stated tolerance: the weight gradient's condition (reference) with 4 more roundings:
    # the running sum after chunk j, S_j, is rounded with an error of at most u |S_j|, and |S_j| is
    # at most |G|^T @ |h| <= the condition; the input gradient is unaffected.
    def refuse(weight):
        raise RuntimeError("acc_dtype=the weight's dtype built the fp32 (V, d) grad-weight sum")

    monkeypatch.setattr(sums, "_WeightGrad", refuse)
    h, w, b = (v.requires_grad_() for v in inputs((16,), dtype, device))
    t = class_ids((16,), V, device)
    for reduction in ("mean", "none"):
        h.grad = w.grad = b.grad = None
        out = fusedls.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                           chunk_size=4, strategy="tokens", acc_dtype=dtype)  # fmt: skip
        (out.sum() if reduction == "none" else out).backward()
        want = reference(h, w, b, t, reduction=reduction, label_smoothing=0.1)
        assert_close(w.grad, *want["weight"][:1], dtype, "weight", roundings=1 + 4, condition=want["weight"][1])
        assert_matches(want, dtype, input=h.grad, bias=b.grad)


def test_auto_strategy_with_the_sum_in_place(monkeypatch):
    # No fp32 (V, d) sum to hold: the token chunks fit where the exact sum would pick the blocks.
    w = torch.empty(1000, 64, dtype=torch.bfloat16)
    assert lct.pick_strategy("auto", 100, w, 32) == "vocab"
    assert lct.pick_strategy("auto", 100, w, 32, sum_in_place=True) == "tokens"
    # and no fp32 sum to round at the end, beside which a chunk as large as the gradient is free:
    # chunks of at most CHUNK_BYTES (4 bf16 rows here, against the head's 8) and of at most a
    # vocabulary block of "vocab"
    monkeypatch.setitem(lct.CHUNK_BYTES, "cpu", 8 * V)
    h, head = torch.empty(25, D, dtype=torch.bfloat16), torch.empty(V, D, dtype=torch.bfloat16)
    assert lct.pass1(h, head, 0, "tokens", True) == (7, None)
    assert lct.pass1(h, head, 0, "tokens", True, sum_in_place=True) == (4, None)
    monkeypatch.setitem(lct.CHUNK_BYTES, "cpu", 1 << 20)
    monkeypatch.setattr(lcv, "VOCAB_BLOCK_COLS", 16)  # a block: 25 rows x 16 classes = 10.8 rows of logits
    assert lct.pass1(h, head, 0, "tokens", True) == (25, None)
    assert lct.pass1(h, head, 0, "tokens", True, sum_in_place=True) == (9, None)  # 3 chunks: 9, 9, 7


@pytest.mark.skipif("triton" not in AVAILABLE, reason="counts the triton launchers' allocations")
def test_weight_gradient_summed_in_place_peak_memory(monkeypatch):
    # Token chunks with the sum in place: grad_hidden, grad_weight (the sum itself) and one chunk
    # of logits; the exact sum holds its fp32 (V, d) copy besides.
    from fusedls.bench.live_bytes import LiveBytes, triton_on_meta

    n, d, v, s = 64, 16, 1024, 2
    monkeypatch.setitem(lct.CHUNK_BYTES, "meta", 16 * v * s)  # 4 chunks of 16 tokens
    peaks = {}
    for acc in (None, torch.bfloat16):
        h = torch.empty(n, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        w = torch.empty(v, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        with triton_on_meta(), fusedls.use_backend("triton"), LiveBytes() as live:
            fusedls.linear_cross_entropy(h, w, torch.zeros(n, dtype=torch.long, device="meta"), label_smoothing=0.1,
                                         strategy="tokens", acc_dtype=acc).backward()  # fmt: skip
        peaks[acc] = live.peak
    grads, chunk = (n + v) * d * s, 16 * v * s
    assert grads + chunk <= peaks[torch.bfloat16] <= grads + chunk + 128 * n
    assert peaks[None] >= peaks[torch.bfloat16] + v * d * 4 - chunk


@needs_torch_api
def test_module_is_torchs_with_the_same_state_and_values(backend, device):
    kwargs = dict(out_features=(2,), bias=True, dtype=torch.float64, reduction="sum", label_smoothing=0.1,
                  weight=torch.rand(V, dtype=torch.float64) + 0.5)  # fmt: skip
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, **kwargs).to(device)
    torch.manual_seed(0)
    mine = fusedls.nn.LinearCrossEntropyLoss(D, V, **kwargs, chunk_size=3, return_accuracy=True).to(device)
    assert isinstance(mine, torch.nn.LinearCrossEntropyLoss)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    x = torch.randn(5, D, dtype=torch.float64, device=device)
    t = class_ids((5, 2), V, device)
    out, want = mine(x, t), theirs(x, t)
    torch.testing.assert_close(out.loss, want, **tolerance(torch.float64))
    out.loss.backward()
    want.backward()
    torch.testing.assert_close(mine.linear.weight.grad, theirs.linear.weight.grad, **tolerance(torch.float64))
    assert "chunk_size=3" in repr(mine) and "num_classes=37" in repr(mine)


def test_module_without_torchs_class_has_torchs_state():
    # torch < 2.13 has no nn.LinearCrossEntropyLoss: fusedls's rebuild of it has its constructor,
    # parameters and errors.
    base = fusedls.nn._TorchLinearCrossEntropyLoss
    torch.manual_seed(0)
    module = base(D, V, out_features=(3,), bias=True)
    assert module.linear.weight.shape == (3 * V, D) and module.linear.bias.shape == (3 * V,)
    assert module.num_classes == V and module.out_features == (3,) and module.ignore_index is None
    if HAS_TORCH_API:
        torch.manual_seed(0)
        theirs = torch.nn.LinearCrossEntropyLoss(D, V, out_features=(3,), bias=True)
        for key, value in theirs.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="expected label_smoothing to be in range"):
        base(D, V, label_smoothing=2.0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['softcapping'\\]"):
        fusedls.nn.LinearCrossEntropyLoss(D, V, softcapping=3.0)
