"""fusedls.cross_entropy's own options (z_loss, softcap, return_z_loss, return_lse,
return_accuracy) against the float64 torch composition that defines them
(fusedls.testing.reference_cross_entropy_options; torch.argmax of the float64 logits), on every
backend."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fusedls
from fusedls.backend import registry
from fusedls.testing import assert_close, reference_cross_entropy_options

from test_cross_entropy import PROPERTY_SETTINGS, class_ids, logits, random_inputs, same_layout

OPTIONS = [(0.05, None), (0.0, 4.0), (0.05, 4.0)]  # (z_loss, softcap)


def check_options(x, t, w=None, *, upstream=1.0, inplace=False, **kwargs):
    """fusedls vs the float64 composition: loss, z-loss term, lse, d/dinput (and d/dtarget for
    probability targets that require grad). Returns fusedls's result."""
    xd = x.detach().double().requires_grad_()
    prob = t.is_floating_point()
    td = t.detach().double().requires_grad_(t.requires_grad) if prob else t
    ref, ref_z, ref_lse = reference_cross_entropy_options(xd, td, w, **kwargs)
    up = torch.as_tensor(upstream, dtype=torch.float64, device=x.device).expand_as(ref)
    wants = [v for v in (xd, td) if v.requires_grad]
    ref_grads = torch.autograd.grad(ref, wants, up) if ref.numel() else [torch.zeros_like(v) for v in wants]
    xa = same_layout(x).requires_grad_()
    ta = same_layout(t).requires_grad_(t.requires_grad) if prob else t
    out = fusedls.cross_entropy(xa, ta, w, inplace_backward=inplace, return_z_loss=True, return_lse=True, **kwargs)
    assert isinstance(out, fusedls.CrossEntropyResult)
    assert out.loss.shape == ref.shape and out.z_loss.shape == ref.shape and out.lse.shape == ref_lse.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    assert out.lse.dtype == acc and not out.lse.requires_grad and not out.z_loss.requires_grad
    assert_close(out.loss, ref, x.dtype, "loss")
    assert_close(out.z_loss, ref_z, x.dtype, "z_loss")
    assert_close(out.lse, ref_lse, acc, "lse")
    out.loss.backward(up.to(out.loss.dtype))
    roundings = 1 if bool((torch.as_tensor(upstream) == 1).all()) else 2
    assert_close(xa.grad, ref_grads[0], x.dtype, "grad input", roundings)
    if prob and t.requires_grad:
        assert_close(ta.grad, ref_grads[1], x.dtype, "grad target")
    return out


@pytest.mark.parametrize("z_loss, softcap", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_ids(backend, small_chunks, device, z_loss, softcap, reduction, weighted):
    n_rows, n_cols = 11, 37  # three chunks of 16, the last one masked
    x = logits((n_rows, n_cols), torch.float32, device)
    t = class_ids((n_rows,), n_cols, device, ignored=0.25)
    w = torch.rand(n_cols, device=device) + 0.1 if weighted else None
    up = torch.randn(n_rows, dtype=torch.float64).to(device) if reduction == "none" else 0.7
    check_options(x, t, w, z_loss=z_loss, softcap=softcap, reduction=reduction, label_smoothing=0.1, upstream=up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
def test_half_precision_and_inplace(backend, small_chunks, device, dtype, inplace):
    x = logits((9, 37), dtype, device, scale=6.0)  # many logits beyond the cap
    t = class_ids((9,), 37, device)
    for reduction in ["mean", "none"]:
        check_options(x, t, z_loss=1e-2, softcap=5.0, reduction=reduction, label_smoothing=0.1, inplace=inplace)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_grad", [False, True])
def test_probability_targets(backend, small_chunks, device, reduction, target_grad):
    x = logits((7, 23), torch.float32, device)
    t = torch.softmax(logits((7, 23), torch.float64, "cpu", seed=3), 1).float().to(device)
    t.requires_grad_(target_grad)
    w = torch.rand(23, device=device) + 0.1
    up = torch.randn(7, dtype=torch.float64).to(device) if reduction == "none" else 1.0
    check_options(x, t, w, z_loss=0.02, softcap=3.0, reduction=reduction, label_smoothing=0.1, upstream=up)


def test_k_dimensional_and_ignored_rows(backend, device):
    x = logits((2, 7, 3), torch.float32, device)
    t = class_ids((2, 3), 7, device, ignored=0.3)
    out = check_options(x, t, z_loss=0.1, softcap=2.0, reduction="none", upstream=torch.randn(2, 3).double())
    assert (out.lse[t == -100] == 0).all() and (out.z_loss[t == -100] == 0).all()
    # every row ignored: NaN mean, zero gradient
    check_options(x, torch.full((2, 3), -100, device=device), z_loss=0.1, softcap=2.0)


def test_softcap_limits_the_logits(backend, device):
    # Huge logits: capped at s, so lse <= s + log C exactly as the composition says.
    x = torch.tensor([[1e4, -1e4, 0.0, 3.0]], device=device)
    out = check_options(x, torch.tensor([1], device=device), softcap=10.0, z_loss=1e-3)
    assert out.lse.item() < 10.0 + 2.0


def test_softcap_gradient_far_below_the_cap(backend, device):
    # Every logit of row 0, and row 1's target, below -8.3 s: there tanh(x / s) rounds to -1 in
    # fp32, and a derivative formed as 1 - tanh^2 is exactly 0, where 4 e / (1 + e)^2 with
    # e = exp(-2 |x| / s) is ~1e-7. The upstream 2**16 (a loss scale) lifts those gradients far
    # above fp32's atol.
    x = torch.tensor([[-8.5, -9.0, -10.0, -12.0], [1.0, -2.0, 0.5, -9.0]], device=device)
    check_options(x, torch.tensor([1, 3], device=device), softcap=1.0, reduction="sum", upstream=2.0**16)


def test_plain_call_returns_a_tensor_and_options_default_off(backend, device):
    x = logits((5, 9), torch.float32, device)
    t = class_ids((5,), 9, device)
    plain = fusedls.cross_entropy(x, t)
    assert isinstance(plain, torch.Tensor)
    only_lse = fusedls.cross_entropy(x, t, return_lse=True)
    assert only_lse.z_loss is None and torch.equal(only_lse.loss, plain)
    loss, z, lse, accuracy = fusedls.cross_entropy(x, t, return_z_loss=True)
    assert lse is None and accuracy is None and z == 0 and torch.equal(loss, plain)


def test_features_passed_to_backend_resolution(monkeypatch, device):
    # A backend listing the options as UNSUPPORTED is passed over by auto (the C++ backend will).
    seen = []
    real = registry.resolve

    def spy(device, dtype, op=None, features=()):
        seen.append(frozenset(features))
        return real(device, dtype, op, features)

    monkeypatch.setattr(registry, "resolve", spy)
    x = logits((3, 8), torch.float32, device)
    t = class_ids((3,), 8, device, ignored=0)
    fusedls.cross_entropy(x, t)
    fusedls.cross_entropy(x, t, z_loss=0.1, softcap=3.0, return_lse=True)
    fusedls.cross_entropy(x, t, z_loss=0.0, return_z_loss=True)
    fusedls.cross_entropy(x, t, return_accuracy=True)
    assert seen == [frozenset(), frozenset({"z_loss", "softcap", "return_lse"}), frozenset(),
                    frozenset({"return_accuracy"})]  # fmt: skip


BAD_OPTIONS = [
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap="3"), TypeError, "softcap must be a float"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=None), TypeError, "z_loss must be a float"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(return_accuracy=None), TypeError, "return_accuracy must be a bool"),
    (dict(return_accuracy=True, target=torch.rand(2, 5)), ValueError, "return_accuracy needs a target of class ids"),
]


@pytest.mark.parametrize("override, error, message", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options(override, error, message):
    target = override.pop("target", torch.tensor([0, 1]))
    with pytest.raises(error, match=message):
        fusedls.cross_entropy(torch.zeros(2, 5), target, **override)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, device, reduction):
    torch._dynamo.reset()
    x = logits((6, 19), torch.float32, device)
    t = class_ids((6,), 19, device)

    def step(x, t):
        loss, z, lse, accuracy = fusedls.cross_entropy(
            x, t, reduction=reduction, z_loss=0.05, softcap=4.0, return_z_loss=True, return_lse=True,
            return_accuracy=True,
        )  # fmt: skip
        return loss.sum(), z.sum(), lse, accuracy

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    xa = x.clone().requires_grad_()
    loss, z, lse, accuracy = compiled(xa, t)
    torch.testing.assert_close(accuracy, reference_accuracy(x, t, reduction=reduction), rtol=0, atol=0)
    loss.backward()
    xd = x.double().requires_grad_()
    ref, ref_z, ref_lse = reference_cross_entropy_options(xd, t, z_loss=0.05, softcap=4.0, reduction=reduction)
    ref.sum().backward()
    assert_close(loss, ref.sum())
    assert_close(z, ref_z.sum())
    assert_close(lse, ref_lse)
    assert_close(xa.grad, xd.grad)


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(
    n_rows=st.integers(0, 7),
    n_cols=st.integers(1, 50),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    weighted=st.booleans(),
    prob=st.booleans(),
    ignored=st.floats(0.0, 1.0),
    z_loss=st.sampled_from([0.0, 1e-4, 0.1]),
    softcap=st.sampled_from([None, 0.5, 30.0]),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Row 1's target at x / s = -8.39: its gradient needs the cap's derivative where tanh rounds to -1.
@example(n_rows=2, n_cols=3, dtype=torch.float32, reduction="sum", label_smoothing=0.0, weighted=False, prob=False,
         ignored=0.0, z_loss=0.0, softcap=0.5, inplace=False, seed=0)  # fmt: skip
def test_property_random_configurations(
    backend, small_chunks, device, n_rows, n_cols, dtype, reduction, label_smoothing, weighted, prob, ignored,
    z_loss, softcap, inplace, seed,
):  # fmt: skip
    x, t, w, up = random_inputs(n_rows, n_cols, dtype, device, reduction, weighted, prob, ignored, seed)
    kwargs = dict(z_loss=z_loss, softcap=softcap, reduction=reduction, label_smoothing=label_smoothing)
    check_options(x, t, w, upstream=up, inplace=inplace, **kwargs)


def reference_accuracy(x, t, *, reduction="mean", ignore_index=-100, class_dim=1):
    """Token accuracy from torch.argmax of the float64 logits (the first of tied maxima)."""
    valid = t != ignore_index
    right = ((x.double().argmax(class_dim if x.dim() > 1 else 0) == t) & valid).float()
    if reduction == "none":
        return right
    return right.sum() if reduction == "sum" else right.sum() / valid.sum()


def tied_logits(n_rows, n_cols, dtype, device):
    """Logits whose rows hold ties at the maximum: row 0 between classes 3 and 30 (other kernel
    chunks under small_chunks), row 1 between 30 and 36 (the last, masked, chunk), row 2 a row of
    -inf with one finite class; the targets hit and miss those maxima."""
    x = logits((n_rows, n_cols), torch.float32, device)
    x[0, [3, 30]] = 20.0
    x[1, [30, 36]] = 20.0
    x[2] = float("-inf")
    x[2, 5] = 0.0
    t = class_ids((n_rows,), n_cols, device, ignored=0.25)
    t[:6] = torch.tensor([3, 36, 5, -100, 2, 7], device=device)  # first max, second max, only class, ignored
    t[4] = x[4].argmax()
    return x.to(dtype), t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, inplace", [(None, False), (4.0, False), (None, True)])
def test_accuracy(backend, small_chunks, device, reduction, dtype, softcap, inplace):
    # The argmax comes from the kernels' first sweep (chunks of 16 classes here): ties count for
    # the first maximum only, as torch.argmax; ignored rows count for nothing; the loss and its
    # gradient are those of the call without return_accuracy.
    x, t = tied_logits(13, 37, dtype, device)
    xa = x.clone().requires_grad_()
    out = fusedls.cross_entropy(xa, t, reduction=reduction, softcap=softcap, inplace_backward=inplace,
                                label_smoothing=0.1, return_accuracy=True)  # fmt: skip
    want = reference_accuracy(x, t, reduction=reduction)
    assert out.accuracy.dtype == torch.float32 and not out.accuracy.requires_grad and out.z_loss is None
    torch.testing.assert_close(out.accuracy, want, rtol=0, atol=0)
    if reduction == "none":
        assert out.accuracy[:5].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    plain = x.clone().requires_grad_()
    loss = fusedls.cross_entropy(plain, t, reduction=reduction, softcap=softcap, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0)
    (out.loss.sum() if reduction == "none" else out.loss).backward()
    (loss.sum() if reduction == "none" else loss).backward()
    torch.testing.assert_close(xa.grad, plain.grad, rtol=0, atol=0)


def test_accuracy_shapes_and_ignore_index(backend, device):
    # (N, C, d) input: per-position accuracy shaped like the target; ignore_index a real class.
    x = logits((3, 11, 4), torch.float32, device)
    t = class_ids((3, 4), 11, device, ignore_index=0, ignored=0.3)
    t[0, 0] = x[0, :, 0].argmax()
    for reduction in ("none", "mean"):
        got = fusedls.cross_entropy(x, t, ignore_index=0, reduction=reduction, return_accuracy=True).accuracy
        torch.testing.assert_close(got, reference_accuracy(x, t, reduction=reduction, ignore_index=0), rtol=0, atol=0)
    every_row_ignored = fusedls.cross_entropy(x[:, :, 0], torch.full((3,), -100, device=device), return_accuracy=True)
    assert every_row_ignored.accuracy.isnan() and every_row_ignored.loss.isnan()
