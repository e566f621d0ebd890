"""torch.compile(fullgraph=True) over code that calls fusedls: no graph break, same numbers."""

import pytest
import torch

import fusedls
from fusedls.testing import assert_close, reference_cross_entropy

from test_cross_entropy import class_ids, logits

OP = "cross_entropy"  # what the backend fixture runs on every backend that has it


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(backend, device, reduction, inplace):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37, dtype=torch.float32).to(device)
    x = torch.randn(12, 8, device=device)
    t = class_ids((12,), 37, device)

    def step(x, t):
        # A model head then the loss, as a training step would call it.
        return fusedls.cross_entropy(
            head(x), t, reduction=reduction, label_smoothing=0.1, inplace_backward=inplace
        ).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x, t)
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    logits_ = head(x).detach().requires_grad_()
    ref, ref_grad, _ = reference_cross_entropy(logits_, t, reduction=reduction, label_smoothing=0.1)
    assert_close(loss, ref.sum())
    # d/dW = dlogits^T x and d/db = sum dlogits, both summed over the 12 rows by an fp32
    # matmul / sum: their terms cancel, so the error is relative to the largest entry.
    for got, want in [(grads[0], ref_grad.T @ x.double()), (grads[1], ref_grad.sum(0))]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_compile_module_and_backend_switch(device):
    torch._dynamo.reset()
    loss_fn = fusedls.nn.CrossEntropyLoss(label_smoothing=0.2)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = logits((5, 11), torch.float32, device).requires_grad_()
    t = class_ids((5,), 11, device)
    with fusedls.use_backend("eager"):
        out = compiled(x, t)
    out.backward()
    ref, ref_grad, _ = reference_cross_entropy(x, t, label_smoothing=0.2)
    assert_close(out, ref)
    assert_close(x.grad, ref_grad)
