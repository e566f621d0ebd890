"""A training step made of fusedls ops under CUDA graphs (``torch.cuda.graph``) and
``torch.compile(mode="reduce-overhead")``, and with host synchronisations forbidden.

The step: a linear layer, ``dropout_add_rms_norm``, an LM head and ``cross_entropy`` with label
smoothing, backward, ``clip_grad_norm_`` and an optimizer step. Without dropout a replayed graph
must train exactly as the eager step does; with dropout every replay must draw a new mask (the
seed is a device-side RNG draw, captured as such), with the kept fraction of p.
"""

import math

import pytest
import torch

import fusedls

from conftest import ON_GPU

pytestmark = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")

D, V, TOKENS = 256, 1000, 512


class Block(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.up = torch.nn.Linear(D, D)
        self.norm = fusedls.nn.DropoutAddRMSNorm(D, p=p)
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, x, target):
        """(loss, h): h = x + dropout(up(x)) shows the mask (dropped where h == x)."""
        y, h = self.norm(self.up(x), x)
        return fusedls.cross_entropy(self.head(y), target, label_smoothing=0.1), h


def _model(p):
    torch.manual_seed(0)
    return Block(p).cuda()


def _step(model, opt, x, t):
    opt.zero_grad(set_to_none=False)
    loss, h = model(x, t)
    loss.backward()
    fusedls.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, h


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(TOKENS, D, device="cuda", generator=g)
    t = torch.randint(0, V, (TOKENS,), device="cuda", generator=g)
    return x, t


def _captured(model, opt, x, t):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph requires
            _step(model, opt, x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=graph):
        out = _step(model, opt, x, t)
    return g, out


def test_replayed_step_trains_as_the_eager_step():
    x, t = _inputs()
    eager, graphed = _model(0.0), _model(0.0)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    for _ in range(3):  # the captured model's warm-up steps, done eagerly here too
        _step(eager, opt_e, x, t)
    g, (loss_g, _) = _captured(graphed, opt_g, x, t)  # capturing records the step, runs nothing
    for _ in range(5):
        g.replay()
        loss_e, _ = _step(eager, opt_e, x, t)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_replay_draws_a_new_mask():
    x, t = _inputs()
    model = _model(0.3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g, (_, h) = _captured(model, opt, x, t)
    masks = []
    for _ in range(3):
        g.replay()
        masks.append((h - x) != 0)  # h = x + dropout(up(x)): dropped where h == x
    torch.cuda.synchronize()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    kept = masks[2].double().mean().item()
    assert abs(kept - 0.7) < 6 * math.sqrt(0.21 / masks[2].numel())


def test_compiled_reduce_overhead_step():
    x, t = _inputs()
    model = _model(0.3)
    step = torch.compile(model, mode="reduce-overhead")
    losses, masks = [], []
    for _ in range(6):
        loss, h = step(x, t)
        loss.backward()
        losses.append(loss.detach().clone())
        masks.append((h - x) != 0)
        model.zero_grad()
    assert all(torch.isfinite(v) for v in losses)
    assert not torch.equal(masks[-1], masks[-2])  # replays draw new masks


def test_no_host_synchronisation_in_the_step():
    x, t = _inputs()
    model = _model(0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    _step(model, opt, x, t)  # first call: tables, compilation, caches
    hidden = torch.randn(TOKENS, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(V, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    calls = [
        lambda: _step(model, opt, x, t),
        lambda: fusedls.linear_cross_entropy(hidden, head, t, label_smoothing=0.1).backward(),
        lambda: fusedls.vector_norm(x, dim=-1),
        lambda: fusedls.l2_penalty(list(model.parameters())).backward(),
        lambda: fusedls.dropout(x, 0.1),
    ]
    for call in calls:
        call()  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
