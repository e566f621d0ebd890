"""fusedls.linear_cross_entropy as a drop-in for torch's F.linear_cross_entropy (torch >= 2.13).

The test set is torch's own: every OpInfo sample of ``nn.functional.linear_cross_entropy`` (the
reference, ``chunked`` and ``chunked_none`` variants of ``op_db``: 1-D and 2-D inputs,
K-dimensional weights with their biases, class ids and probability targets, class weights,
``ignore_index``, every reduction, ``options``). Each runs through fusedls with its own dtype and
``options`` and is compared with torch's reference path (``options=None``) on float64 copies of
the same values: the loss, and the gradients of input, linear_weight, linear_bias and a
probability target (those that require grad), within ``fusedls.testing.tolerance`` of the
sample's dtype (bf16: the logits rounded to bf16 in the reference too, as every bf16 head rounds
them; atol relative to the largest element, as the gradient sums over tokens cancel). Plus
torch's error inputs (same exception classes), the options, the deprecated names, and
``nn.LinearCrossEntropyLoss``.
"""

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedls
from fusedls.testing import tolerance

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")

VARIANTS = ("", "chunked", "chunked_none")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is several times faster than waking the others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def opinfos():
    pytest.importorskip("expecttest")  # torch.testing._internal imports it
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.name == "nn.functional.linear_cross_entropy"]


def samples(opinfos, dtype):
    """Every OpInfo sample at ``dtype`` (seeded: make_tensor draws from torch's and random's generators)."""
    torch.manual_seed(0)
    random.seed(0)
    for op in opinfos:
        for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
            yield op.variant_test_name, sample


def reference(sample, dtype, upstream):
    """torch's reference path on float64 copies: (loss, grads of the leaves that require grad)."""
    leaves = {"input": sample.input, "linear_weight": sample.args[0]}
    kwargs = dict(sample.kwargs)
    kwargs.pop("options", None)
    if kwargs.get("linear_bias") is not None:
        leaves["linear_bias"] = kwargs.pop("linear_bias")
    target = sample.args[1]
    prob = target.is_floating_point()
    if prob:
        leaves["target"] = target
    copies = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].double()
    w, b, t = copies["linear_weight"], copies.get("linear_bias"), copies.get("target", target)
    kwargs.pop("linear_bias", None)
    if dtype == torch.float64:  # torch's function itself
        loss = F.linear_cross_entropy(copies["input"], w, t, linear_bias=b, options=None, **kwargs)
    else:  # its reference path (F.linear, reshape, F.cross_entropy) with the logits rounded to dtype
        logits = F.linear(copies["input"], w.reshape(-1, w.shape[-1]), b.reshape(-1) if b is not None else None)
        logits = logits.to(dtype).double().reshape(*copies["input"].shape[:-1], *w.shape[:-1])
        ignore_index = kwargs.pop("ignore_index", None)
        loss = F.cross_entropy(logits, t, ignore_index=-100 if ignore_index is None else ignore_index, **kwargs)
    wants = {k: v for k, v in copies.items() if v.requires_grad}
    grads = torch.autograd.grad(loss, list(wants.values()), upstream.double()) if wants else []
    return loss.detach(), dict(zip(wants, grads))


def close(actual, expected, dtype, what, roundings=1):
    tol = tolerance(dtype, roundings)
    atol = tol["rtol"] * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol["rtol"], atol=max(atol, tol["atol"]),
                               equal_nan=True, msg=what)  # fmt: skip


def run_sample(sample, dtype):
    """fusedls on the sample (its own options) against the reference; raises on a mismatch."""
    kwargs = dict(sample.kwargs)
    leaves = {"input": sample.input, "linear_weight": sample.args[0], "linear_bias": kwargs.get("linear_bias"),
              "target": sample.args[1] if sample.args[1].is_floating_point() else None}  # fmt: skip
    mine = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items() if v is not None}
    if "linear_bias" in mine:
        kwargs["linear_bias"] = mine["linear_bias"]
    target = mine.get("target", sample.args[1])
    out = fusedls.linear_cross_entropy(mine["input"], mine["linear_weight"], target, **kwargs)
    gen = torch.Generator().manual_seed(1)
    upstream = (torch.randn(out.shape, generator=gen, dtype=torch.float64) if out.dim() else torch.ones(())).to(dtype)
    ref, ref_grads = reference(sample, dtype, upstream)
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, ref.shape, out.dtype)
    close(out, ref, dtype, "loss")
    if not ref_grads:
        return
    out.backward(upstream)
    for name, want in ref_grads.items():
        got = mine[name].grad
        assert got is not None and got.dtype == dtype, name
        close(got, want, dtype, f"grad {name}", roundings=1 if out.dim() == 0 else 2)


def describe(sample) -> str:
    shapes = [tuple(t.shape) for t in (sample.input, *sample.args)]
    kwargs = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}
    return f"{shapes} {sample.args[1].dtype} {kwargs}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_opinfo_sample(opinfos, one_thread, dtype):
    # 329 samples in float64, 371 in bfloat16 (the chunked variants add acc_dtype=float32 there);
    # all must pass, on the default backend (cpp or eager on the CPU, triton on a GPU).
    counts, failures = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's chunked path warns when it falls back; not fusedls's
        for variant, sample in samples(opinfos, dtype):
            counts[variant] = counts.get(variant, 0) + 1
            try:
                run_sample(sample, dtype)
            except Exception as exc:  # noqa: BLE001 - every failure is listed
                failures.append(f"{variant or 'reference'} {describe(sample)}: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]}")  # fmt: skip
    total = sum(counts.values())
    assert set(counts) == set(VARIANTS) and total == {torch.float64: 329, torch.bfloat16: 371}[dtype], counts
    assert not failures, f"{len(failures)} of {total} samples fail:\n" + "\n".join(failures[:20])


def test_error_inputs_raise_torchs_exception_classes(opinfos):
    # torch raises RuntimeError for each; fusedls raises its ValueError / TypeError that is also one.
    seen = 0
    for op in opinfos[:1]:
        for error in op.error_inputs("cpu"):
            s = error.sample_input
            with pytest.raises(error.error_type) as raised:
                fusedls.linear_cross_entropy(s.input, *s.args, **s.kwargs)
            assert isinstance(raised.value, (ValueError, TypeError)), raised.value
            seen += 1
    assert seen == 6
