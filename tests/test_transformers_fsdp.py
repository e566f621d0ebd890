"""A patched model under FSDP2 (``fully_shard``): the fused loss reads the gathered output embedding.

Two gloo processes on CPU (where there is a GPU and NCCL, also one NCCL process per GPU) shard a
tiny model (each decoder layer its own unit; the Llama head too, so its weight is a shard outside
its own forward, which is where a fused loss that reads ``lm_head.weight`` directly goes wrong; the
GPT-2 head, tied to the input embedding, in the root unit). Each rank trains on its own batch; its
loss and every gathered gradient (FSDP averages them over the ranks) are compared with the
unpatched, unsharded model in float64 on all the ranks' batches.
"""

from __future__ import annotations

import copy
import datetime
import os
import queue as queue_module
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

import fusedls.transformers as ft  # noqa: E402
from fusedls.testing import assert_close, tolerance  # noqa: E402
from test_transformers import batch, reference_loss, tiny_model  # noqa: E402

TIMEOUT_S = 300
EPS = 0.1
CASES = (("llama", True), ("gpt2", False))  # (architecture, the head is its own FSDP unit)
GROUPS = (("cpu", 2), ("cuda", max(torch.cuda.device_count(), 1)))


def _layers(model):
    decoder = model.get_decoder()
    return decoder.layers if hasattr(decoder, "layers") else decoder.h


def _run_case(arch: str, shard_head: bool, rank: int, world: int, device: str) -> None:
    model = tiny_model(arch).to(device)
    reference = copy.deepcopy(model).double()
    ft.apply(model, label_smoothing=EPS)
    mesh = init_device_mesh(device, (world,))
    for layer in _layers(model):
        fsdp.fully_shard(layer, mesh=mesh)
    if shard_head:
        fsdp.fully_shard(model.lm_head, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    head = model.lm_head.weight
    if world > 1:
        assert head.to_local().shape[0] < head.shape[0], "the head is not sharded: the test would check nothing"
    ids, labels = (t.to(device) for t in batch(seed=rank))
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    for r in range(world):  # FSDP's gradient: the mean over the ranks of each rank's gradient
        ref_ids, ref_labels = (t.to(device) for t in batch(seed=r))
        ref_loss = reference_loss(reference(input_ids=ref_ids).logits, ref_labels, EPS)
        (ref_loss / world).backward()
        if r == rank:
            assert_close(out.loss, ref_loss, torch.float32)
    rtol = tolerance(torch.float32)["rtol"]
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad.full_tensor()
        torch.testing.assert_close(grad.double(), q.grad, rtol=rtol, atol=rtol * float(q.grad.abs().max()),
                                   msg=lambda m: f"{name}: {m}")  # fmt: skip


def _worker(rank: int, device: str, world: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    out = {}
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
        for arch, shard_head in CASES:
            try:
                _run_case(arch, shard_head, rank, world, device)
                out[arch] = None
            except Exception:
                out[arch] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        out["<worker>"] = traceback.format_exc()
    results.put((rank, out))


def _runnable(device: str) -> bool:
    if not dist.is_available():
        return False
    return dist.is_gloo_available() if device == "cpu" else torch.cuda.is_available() and dist.is_nccl_available()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{device: {rank: {architecture: traceback or None}}}, one spawn per device."""
    found = {}
    for device, world in GROUPS:
        if not _runnable(device):
            continue
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        init_file = str(tmp_path_factory.mktemp("fsdp") / "init")
        procs = [ctx.Process(target=_worker, args=(rank, device, world, init_file, results)) for rank in range(world)]
        for proc in procs:
            proc.start()
        found[device] = {}
        try:
            for _ in range(world):
                rank, out = results.get(timeout=TIMEOUT_S)
                found[device][rank] = out
        except queue_module.Empty:
            pass
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return found


@pytest.mark.parametrize("device,world", GROUPS, ids=[g[0] for g in GROUPS])
@pytest.mark.parametrize("arch,shard_head", CASES, ids=[c[0] for c in CASES])
def test_fully_shard_matches_unsharded(outcomes, device, world, arch, shard_head):
    if not _runnable(device):
        pytest.skip(f"needs torch.distributed with {'gloo' if device == 'cpu' else 'a CUDA device and NCCL'}")
    failures = []
    for rank in range(world):
        got = outcomes[device].get(rank)
        if got is None:
            failures.append(f"rank {rank}: no result (the worker crashed or hung)")
        elif "<worker>" in got:
            failures.append(f"rank {rank}: worker failed:\n{got['<worker>']}")
        elif got.get(arch) is not None:
            failures.append(f"rank {rank}:\n{got[arch]}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
