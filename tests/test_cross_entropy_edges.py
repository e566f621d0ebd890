"""cross_entropy at the edges: degenerate sizes, extreme values, bad input, the module."""

import pytest
import torch
import torch.nn.functional as F

import fusedls
from fusedls.testing import assert_close, reference_cross_entropy

from test_cross_entropy import check, class_ids, logits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch(backend, device, reduction, prob):
    x = torch.zeros(0, 11, device=device)
    t = torch.zeros(0, 11, device=device) if prob else torch.zeros(0, dtype=torch.long, device=device)
    out = check(x, t, label_smoothing=0.1, reduction=reduction)
    assert out.isnan().all() if reduction == "mean" else out.eq(0).all()  # torch: 0/0 and 0


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_all_rows_ignored(backend, device, weighted, inplace):
    # torch: mean is NaN (0/0) but the gradient is zero, not NaN.
    x = logits((5, 13), torch.float32, device)
    t = torch.full((5,), -100, device=device)
    w = torch.rand(13, device=device) if weighted else None
    assert check(x, t, w, label_smoothing=0.1, inplace=inplace).isnan()
    assert check(x, t, w, reduction="sum", inplace=inplace) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_with_huge_logits(backend, device, reduction, inplace):
    # exp(1000 - 0) overflows: an ignored row's gradient must still be 0 (torch), not 0 * inf.
    x = logits((4, 13), torch.float32, device) + 1000.0
    t = class_ids((4,), 13, device)
    t[1] = t[3] = -100
    check(x, t, label_smoothing=0.1, reduction=reduction, inplace=inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_logits(backend, small_chunks, device, dtype):
    big = {torch.float16: 6e4, torch.bfloat16: 1e30, torch.float32: 1e30}[dtype]
    x = logits((6, 40), torch.float64, "cpu") * (big / 10)
    x = x.clamp(-big, big).to(dtype).to(device)
    check(x, class_ids((6,), 40, device), label_smoothing=0.1)
    check(x, class_ids((6,), 40, device), label_smoothing=0.0, reduction="none")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("prob", [False, True])
def test_minus_inf_logits(backend, small_chunks, device, label_smoothing, prob):
    # Masked vocabularies: -inf logits. A whole chunk of -inf (columns 16..31) and -inf at the
    # target give torch's inf/NaN; everything else stays finite, as in torch.
    x = logits((4, 40), torch.float32, device)
    x[:, 16:32] = float("-inf")
    x[1, 5] = float("-inf")
    if prob:
        t = torch.softmax(torch.randn(4, 40, dtype=torch.float64), 1).float().to(device)
        t[:, 16:32] = 0.0
    else:
        t = torch.tensor([0, 5, 39, -100], device=device)
    for reduction in ["none", "sum"]:
        check(x, t, label_smoothing=label_smoothing, reduction=reduction)


def test_row_of_only_minus_inf(backend, device):
    x = torch.full((2, 20), float("-inf"), device=device)
    x[1] = torch.randn(20)
    check(x, torch.tensor([3, 4], device=device), reduction="none")


def test_fp16_smoothing_where_torch_overflows(backend, device):
    """torch sums fp16 log-probabilities over the classes in fp16: -sum(log p) over 40,000
    classes passes 65,504 and the smoothed loss becomes inf. fusedls sums in fp32 and matches
    the float64 truth."""
    n_cols = 40000
    x = logits((3, n_cols), torch.float16, device, scale=1.0)
    t = class_ids((3,), n_cols, device, ignored=0.0)
    torch_loss = F.cross_entropy(x.float().to(torch.float16) if device == "cpu" else x, t, label_smoothing=0.1)
    ref, _, _ = reference_cross_entropy(x, t, label_smoothing=0.1)
    ours = fusedls.cross_entropy(x, t, label_smoothing=0.1)
    assert not torch.isfinite(torch_loss)  # torch's answer
    assert torch.isfinite(ref) and 10 < ref < 12  # the truth: about log(40000) = 10.6
    assert_close(ours, ref)


def test_out_of_range_targets(backend, device):
    x = logits((4, 10), torch.float32, device).requires_grad_()
    t = torch.tensor([1, 10, -100, -3], device=device)
    if backend in ("eager", "cpp") and device == "cpu":  # each CPU backend's own check, free there
        with pytest.raises(ValueError, match="target contains class id 10"):
            fusedls.cross_entropy(x, t)
        return
    # On GPU (and the kernels under the interpreter): NaN loss and NaN gradient rows for the
    # bad rows only, without a host synchronisation and without reading outside the row.
    out = fusedls.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    out.sum().backward()
    assert out[[1, 3]].isnan().all() and out[0].isfinite() and out[2] == 0
    assert x.grad[[1, 3]].isnan().all() and x.grad[0].isfinite().all() and (x.grad[2] == 0).all()
    assert fusedls.cross_entropy(x.detach(), t).isnan()


def test_out_of_range_targets_checked_on_request(backend, device, monkeypatch):
    monkeypatch.setenv("FUSEDLS_CHECK_TARGETS", "1")
    fusedls.set_backend(None)  # the environment is read at import and by set_backend(None)
    with fusedls.use_backend(backend), pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        fusedls.cross_entropy(logits((2, 10), torch.float32, device), torch.tensor([0, 10], device=device))


def test_backward_twice_is_refused(backend, device):
    # The fused gradient is rescaled in place; autograd refuses to reuse it.
    x = logits((3, 10), torch.float32, device).requires_grad_()
    loss = fusedls.cross_entropy(x, class_ids((3,), 10, device, ignored=0))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_weight_without_grad_and_target_without_grad(backend, device):
    x = logits((3, 10), torch.float32, device)  # nothing requires grad: forward only
    w = torch.rand(10, device=device)
    out = fusedls.cross_entropy(x, class_ids((3,), 10, device), w, label_smoothing=0.2)
    assert not out.requires_grad
    assert_close(out, reference_cross_entropy(x, class_ids((3,), 10, device), w, label_smoothing=0.2)[0])


@pytest.mark.filterwarnings("ignore:size_average and reduce")
def test_legacy_size_average_and_reduce(backend, device):
    x = logits((4, 6), torch.float32, device)
    t = class_ids((4,), 6, device, ignored=0)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        ours = fusedls.cross_entropy(x, t, None, size_average, -100, reduce)
        theirs = F.cross_entropy(x.double(), t, None, size_average, -100, reduce)
        assert_close(ours, theirs)


BAD_INPUTS = [
    (dict(target=torch.tensor([0.5, 1.0])), ValueError, "probability target must have"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "batch size 2 does not match target batch size 3"),
    (dict(target=torch.tensor([[0], [1]])), ValueError, "target of class ids must have shape"),
    (dict(target=torch.tensor([True, False])), TypeError, "target must hold class ids"),
    (dict(target=[0, 1]), TypeError, "target must be a torch.Tensor"),
    (dict(input=torch.zeros(2, 5, dtype=torch.long)), TypeError, "input must have a floating-point dtype"),
    (dict(input=torch.tensor(1.0)), ValueError, "input must have at least 1 dimension"),
    (dict(input=torch.zeros(2, 0)), ValueError, "0 classes"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in \\[0, 1\\]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in \\[0, 1\\]"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be in \\[0, 1\\]"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=-100.5), TypeError, "ignore_index must be an int"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have shape \\(5,\\)"),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must have a floating-point dtype"),
    (dict(weight=torch.ones(5, device="meta")), ValueError, "weight is on meta but input is on"),
    (dict(target=torch.tensor([0, 1], device="meta")), ValueError, "target is on meta"),
    (dict(smoothing_convention="kl"), ValueError, "smoothing_convention must be one of"),
]


@pytest.mark.parametrize("override, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input(backend, override, error, message):
    args = dict(input=torch.zeros(2, 5), target=torch.tensor([0, 1]))
    args.update(override)
    with pytest.raises(error, match=message):
        fusedls.cross_entropy(**args)


def test_module_is_a_drop_in(backend, device):
    w = torch.rand(9, device=device) + 0.1
    ours = fusedls.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w.double(), ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = logits((7, 9), torch.float32, device)
    t = class_ids((7,), 9, device, ignored=0)
    xa = x.clone().requires_grad_()
    xb = x.double().requires_grad_()
    ours(xa, t).backward()
    theirs(xb, t).backward()
    assert_close(xa.grad, xb.grad)
    assert "smoothing_convention='uniform'" in repr(ours)
    others = fusedls.nn.CrossEntropyLoss(label_smoothing=0.1, smoothing_convention="others", reduction="sum")
    ref = reference_cross_entropy(x, t, label_smoothing=0.1, smoothing_convention="others", reduction="sum")[0]
    assert_close(others(x, t), ref)


def test_no_grad_computes_no_gradient_and_keeps_the_logits(backend, device):
    # Under torch.no_grad() (evaluation), requires_grad logits must neither get a gradient
    # buffer nor, with inplace_backward, be overwritten.
    x = logits((4, 10), torch.float32, device).requires_grad_()
    before = x.detach().clone()
    with torch.no_grad():
        out = fusedls.cross_entropy(x, class_ids((4,), 10, device), inplace_backward=True)
    assert torch.equal(x.detach(), before)
    assert_close(out, reference_cross_entropy(before, class_ids((4,), 10, device))[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_synchronisation_on_gpu(backend, device, reduction):
    """Forward and backward never wait for the GPU (no .item(), no value-dependent branch):
    CUDA's sync debug mode turns any synchronisation into an error."""
    if device != "cuda":
        pytest.skip("needs a CUDA device")
    x = logits((64, 1000), torch.bfloat16, device).requires_grad_()
    t = class_ids((64,), 1000, device)
    w = torch.rand(1000, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fusedls.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_split_row_grid_runs_whole_rows_within_what_the_device_holds():
    tuning = pytest.importorskip("fusedls.backend.triton.tuning")
    # 396 programs resident, 16 slices a row: 24 rows a round, never more than the device holds
    assert tuning.cross_entropy_split_programs(396, 16, 4096 * 16) == 384
    assert tuning.cross_entropy_split_programs(396, 32, 8 * 32) == 256  # 8 x 256000: one round
    assert tuning.cross_entropy_split_programs(396, 32, 12 * 32) == 384
    assert tuning.cross_entropy_split_programs(20, 32, 4096 * 32) is None  # not one row at once: two-phase


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cooperative split-row variant runs on a GPU only")
@pytest.mark.parametrize("shape", [(8, 256000), (64, 131072), (3, 20000)])
def test_split_rows_cooperative_and_two_phase_agree_on_gpu(monkeypatch, shape):
    # The same math through the device-scope handshake and through two launches: the same
    # merge order, so the same bits; and both against the float64 reference.
    from fusedls.backend.triton import tuning

    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, shape[1], (shape[0],), device="cuda")
    t[0] = -100
    results = []
    with fusedls.use_backend("triton"):
        for cooperative in (True, False):
            monkeypatch.setattr(tuning, "CROSS_ENTROPY_SPLIT_COOPERATIVE", cooperative)
            xi = x.clone().requires_grad_()
            out = fusedls.cross_entropy(xi, t, label_smoothing=0.1, return_accuracy=True)
            out.loss.backward()
            results.append((out.loss, out.accuracy, xi.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    monkeypatch.setattr(tuning, "CROSS_ENTROPY_SPLIT_COOPERATIVE", True)
    with fusedls.use_backend("triton"):
        check(x, t, label_smoothing=0.1)  # the cooperative variant against the float64 reference
