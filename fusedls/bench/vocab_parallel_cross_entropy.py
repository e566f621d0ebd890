"""Vocabulary-parallel cross-entropy on one rank: what ``fusedls.distributed`` costs per rank.

The workload, inputs, check and timed calls are cross-entropy's (``fusedls/bench/cross_entropy.py``):
``(R, V)`` logits, ~1 % ignored rows, ``label_smoothing=0.1``, ``reduction="mean"``. ``V`` plays
the part of one rank's slice of the vocabulary (e.g. 16,032 = 128,256 / 8 ranks). The
``fusedls/distributed`` provider runs :func:`fusedls.distributed.vocab_parallel_cross_entropy`
in a process group of one rank (NCCL on CUDA, gloo on CPU; created by the benchmark when none
exists, with ``vocab_start``/``vocab_size`` given), so it measures the local math and the two
forward collectives of per-row scalars, not the network. Compared with torch eager and with
``fusedls.cross_entropy`` (the single-device loss on the same logits, ``auto`` backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fusedls

from .core import Case, Provider, Slice
from .cross_entropy import IGNORE_INDEX, SMOOTHING, CrossEntropyBench, _loss_module

LOCAL_VOCABS = (16032, 32000, 128256)  # Llama-3's 128,256 over 8 ranks; Llama-2's 32,000; all of Llama-3's


def _why_not(case: Case, device: torch.device) -> str:
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if device.type == "cuda" and not dist.is_nccl_available():
        return "NCCL is not available"
    return ""


def _one_rank_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.HashStore()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


def _distributed():
    def loss(x, target):
        _one_rank_group(x.device)
        return fusedls.distributed.vocab_parallel_cross_entropy(
            x, target, ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING, vocab_start=0, vocab_size=x.shape[-1]
        )

    return loss


def _fusedls():
    def loss(x, target):
        return fusedls.cross_entropy(x, target, ignore_index=IGNORE_INDEX, label_smoothing=SMOOTHING)

    return loss


class VocabParallelCrossEntropyBench(CrossEntropyBench):
    name = "vocab_parallel_cross_entropy"
    workload = CrossEntropyBench.workload + "; V is one rank's slice, in a process group of one rank"
    sweeps = {
        "cuda": [
            Slice(("fwd+bwd",), ("bf16",), (4096, 16384), LOCAL_VOCABS),
            Slice(("fwd", "bwd"), ("bf16",), (16384,), LOCAL_VOCABS),
        ],
        "cuda-quick": [Slice(("fwd+bwd",), ("bf16",), (4096,), LOCAL_VOCABS[:2])],
        "cpu": [Slice(("fwd+bwd",), ("fp32", "bf16"), (1024,), LOCAL_VOCABS[:2])],
        "cpu-quick": [Slice(("fwd+bwd",), ("fp32",), (256,), LOCAL_VOCABS[:2])],
    }

    def providers(self) -> list[Provider]:
        return [
            Provider("torch", "torch", lambda: _loss_module(torch.nn.CrossEntropyLoss)),
            Provider("fusedls", "fusedls", _fusedls),
            Provider("fusedls/distributed", "fusedls", _distributed, _why_not),
        ]


BENCH = VocabParallelCrossEntropyBench()
