"""fusedls.transformers.apply on tiny random models of every supported architecture.

The reference is the unpatched model (a float64 copy of the same weights): its logits through
``F.cross_entropy(..., label_smoothing=eps)`` with transformers' label shift, ``-100`` and
``num_items_in_batch`` conventions (checked against transformers' own loss where it has one:
``eps = 0``). Nothing is downloaded: every model comes from a random config. On a GPU machine the
models run on the GPU (the fused loss on the triton backend), else on the CPU.
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import fusedls.transformers as ft  # noqa: E402
from conftest import DEVICE  # noqa: E402
from fusedls.testing import assert_close, tolerance  # noqa: E402
from fusedls.transformers.configs import ARCHITECTURES, random_config  # noqa: E402

VOCAB = 97
INIT = 0.2  # logits of a few units, so soft-capping and smoothing change the loss visibly
CURVE_STEPS = 20


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0, **overrides):
    """One decoder layer (every kind of parameter, at half the time of two)."""
    torch.manual_seed(seed)
    config = random_config(arch, vocab_size=VOCAB, layers=1, initializer_range=INIT, **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).to(DEVICE, dtype).train()


def batch(seed: int = 1, rows: int = 2, cols: int = 10):
    """input_ids and labels with ignored positions: a padded start and scattered -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, cols), generator=gen)
    labels = ids.masked_fill(torch.rand(rows, cols, generator=gen) < 0.2, -100)
    labels[0, :3] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def reference_loss(logits, labels, eps=0.0, num_items_in_batch=None, shift_labels=None):
    """transformers' conventions written out: shift, -100, mean or sum / num_items_in_batch."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
                           reduction=reduction, label_smoothing=eps)  # fmt: skip
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def assert_grads_close(model, reference, dtype=torch.float32):
    """Every parameter's gradient within ``dtype``'s rtol of the float64 one, with an absolute part
    of rtol x that gradient's largest element (a gradient is a sum over tokens that cancels)."""
    rtol = tolerance(dtype)["rtol"]
    seen = 0
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        if r.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=rtol, atol=rtol * float(r.grad.abs().max()),
                                   msg=lambda m: f"{name}: {m}")  # fmt: skip
        seen += 1
    assert seen == len(list(reference.parameters()))


# --------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("kind", ["ignored", "num_items"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_and_gradients_match_unpatched(arch, eps, kind):
    model = tiny_model(arch)
    reference = copy.deepcopy(model).double()
    ids, labels = batch()
    kwargs = {}
    if kind == "num_items":  # this micro-batch is part of a larger accumulated batch
        kwargs["num_items_in_batch"] = torch.tensor(int((labels[:, 1:] != -100).sum()) + 11, device=DEVICE)
    ft.apply(model, label_smoothing=eps)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()

    logits = reference(input_ids=ids).logits
    expected = reference_loss(logits, labels, eps, **kwargs)
    if eps == 0.0:  # the reference's conventions are transformers' own (whose loss is fp32 even here)
        assert_close(reference(input_ids=ids, labels=labels, **kwargs).loss, expected.detach(), torch.float32)
    expected.backward()
    assert out.logits is None
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, expected, torch.float32)
    assert_grads_close(model, reference)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_curve_and_generate_unchanged(arch):
    """20 AdamW steps on one batch (float64, so the curves may differ only by float64 rounding),
    then greedy generation of the patched and the unpatched model, in eval and in train mode."""
    base = tiny_model(arch, torch.float64)
    patched, reference = copy.deepcopy(base), base
    ft.apply(patched, label_smoothing=0.1)
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (patched, reference)]
    curves = ([], [])
    ids, labels = batch()
    for _ in range(CURVE_STEPS):
        losses = (patched(input_ids=ids, labels=labels).loss, reference_loss(reference(input_ids=ids).logits, labels, 0.1))
        for loss, opt, curve in zip(losses, optims, curves):
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.detach())
    curve, expected = torch.stack(curves[0]), torch.stack(curves[1])
    assert_close(curve, expected, torch.float64)
    assert (curve[-1] < 0.5 * curve[0]).item()  # it trained
    prompt = batch(seed=7)[0][:, :4]
    for train in (False, True):
        patched.train(train), reference.train(train)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(patched.generate(prompt, **kw), reference.generate(prompt, **kw), rtol=0, atol=0)


# ------------------------------------------------------------------- the forward's other uses


@pytest.fixture
def pair():
    """(patched, unpatched) Llama with the same weights, label_smoothing=0.1 on the patched one."""
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    ft.apply(model, label_smoothing=0.1)
    return model, reference


def test_outputs_of_a_fused_forward(pair):
    model, reference = pair
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels, output_hidden_states=True, use_cache=True)
    ref = reference(input_ids=ids, output_hidden_states=True, use_cache=True)
    assert out.logits is None
    assert set(out.keys()) == {"loss", "cache", "hidden_states"}
    assert out.cache.get_seq_length() == ref.cache.get_seq_length() == ids.shape[1]
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert_close(as_tuple[0], reference_loss(ref.logits.double(), labels, 0.1), torch.float32)


def test_logits_when_asked_for_and_in_eval(pair):
    model, reference = pair
    ids, labels = batch()
    ref_logits = reference(input_ids=ids).logits
    expected = reference_loss(ref_logits.double(), labels, 0.1)
    fused = model(input_ids=ids, labels=labels).loss
    for out in (model(input_ids=ids, labels=labels, return_logits=True), model.eval()(input_ids=ids, labels=labels)):
        torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)
        assert_close(out.loss, expected, torch.float32)
    model.train()
    ft.remove(model)
    ft.apply(model, label_smoothing=0.1, return_logits=True)
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)
    assert_close(fused, expected, torch.float32)


def test_logits_to_keep_shift_labels_and_ignore_index():
    """Same loss as transformers' (eps = 0) with labels for the last positions only, with
    pre-shifted ``shift_labels`` and with another ``ignore_index``."""
    model = tiny_model("qwen3")
    reference = copy.deepcopy(model)
    ft.apply(model)
    ids, labels = batch()
    keep = 4
    got = model(input_ids=ids, labels=labels[:, -keep:], logits_to_keep=keep).loss
    want = reference(input_ids=ids, labels=labels[:, -keep:], logits_to_keep=keep).loss
    assert_close(got, want.double(), torch.float32)
    shift = torch.roll(labels, -2, dims=1)  # any alignment: shift_labels are used as given
    got = model(input_ids=ids, labels=labels, shift_labels=shift).loss
    want = reference(input_ids=ids, labels=labels, shift_labels=shift).loss
    assert_close(got, want.double(), torch.float32)
    other = labels.masked_fill(labels == -100, 7)  # another ignore_index, passed as transformers takes it
    got = model(input_ids=ids, labels=other, ignore_index=7).loss
    want = reference(input_ids=ids, labels=other, ignore_index=7).loss
    assert_close(got, want.double(), torch.float32)
    assert not torch.isclose(got, model(input_ids=ids, labels=other).loss)


def test_remove_and_deepcopy(pair):
    model, reference = pair
    signature = inspect.signature(reference.forward)
    assert inspect.signature(model.forward) == signature  # the Trainer reads it (**kwargs, columns)
    ids, labels = batch()
    twin = copy.deepcopy(model)  # a copy is patched on its own weights
    twin.lm_head.weight.data.mul_(2)
    assert twin(input_ids=ids, labels=labels).logits is None
    assert not torch.allclose(twin(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
    ft.remove(model)
    assert ft.patch_of(model) is None
    for module in (model, model.lm_head):
        assert "forward" not in module.__dict__
    assert "_loss_function" not in model.__dict__
    out = model(input_ids=ids, labels=labels)
    ref = reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        ft.remove(model)


# --------------------------------------------------------------------------------- errors


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ft.apply(model, label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        ft.apply(model, label_smoothing="0.1")
    with pytest.raises(ValueError, match="z_loss must be"):
        ft.apply(model, z_loss=-1.0)
    with pytest.raises(TypeError, match="return_logits must be a bool"):
        ft.apply(model, return_logits=1)
    assert ft.patch_of(model) is None  # nothing was half-applied
    ft.apply(model)
    with pytest.raises(ValueError, match="already patched"):
        ft.apply(model)


def test_unsupported_architectures_name_what_is_missing():
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match=r"no output embedding \(get_output_embeddings\(\) returned None\)"):
        ft.apply(llama.model)  # the decoder alone
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32,
                                                                        num_layers=1, num_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="encoder-decoder"):
        ft.apply(t5)
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel"):
        ft.apply(torch.nn.Linear(2, 2))
    # Cohere multiplies its logits by config.logit_scale after the head: refused at the first fused call
    config = transformers.CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, logit_scale=0.5)  # fmt: skip
    cohere = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE).train()
    ft.apply(cohere)
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="transforms its logits after the output embedding"):
        cohere(input_ids=ids, labels=labels)
    assert cohere(input_ids=ids, labels=labels, return_logits=True).logits.shape == (*ids.shape, VOCAB)
