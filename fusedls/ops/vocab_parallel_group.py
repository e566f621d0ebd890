"""The process group and the placement of each rank's classes, for the vocabulary-parallel
losses (``vocab_parallel_cross_entropy.py``, ``vocab_parallel_linear_cross_entropy.py``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ._checks import check_int


@dataclasses.dataclass(frozen=True)
class VocabPartition:
    """Where this rank's classes lie: ``[start, start + size)`` of ``total`` classes."""

    start: int
    size: int
    total: int



def process_group_of(process_group):
    """The group to communicate in (the default one for None); clear errors when there is none."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch; fusedls.distributed needs it")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every rank "
            "before the vocabulary-parallel losses"
        )
    if process_group is None:
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("this rank is not a member of process_group")
    return process_group


def _collective_device(group, device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def vocab_partition(local_size: int, process_group=None, *, device: torch.device | str | None = None) -> VocabPartition:
    """This rank's slice of the classes, from every rank's number of local classes.

    One ``all_gather`` of one int64 per rank, read on the host (a synchronisation): call it
    once and pass ``vocab_start=p.start, vocab_size=p.total`` to the losses so they need no
    communication beyond the loss's own. Slices follow rank order within the group; sizes may
    differ (uneven splits, even 0). ``device``: where the collective runs (by default CUDA for
    NCCL, CPU otherwise). Every rank of the group must call it.
    """
    local_size = check_int("local_size", local_size)
    if local_size < 0:
        raise ValueError(f"local_size must be >= 0, got {local_size}")
    group = process_group_of(process_group)
    device = _collective_device(group, device)
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    sizes = torch.cat(sizes).tolist()
    rank = dist.get_rank(group)
    return VocabPartition(start=sum(sizes[:rank]), size=local_size, total=sum(sizes))


def placement(n_local, group, device, vocab_start, vocab_size) -> tuple[int, int]:
    """(start, total) from the arguments, or from one all_gather when either is missing."""
    if vocab_start is not None:
        check_int("vocab_start", vocab_start)
    if vocab_size is not None:
        check_int("vocab_size", vocab_size)
    if vocab_start is None or vocab_size is None:
        if torch.compiler.is_compiling():  # the all_gather's answer is data the graph cannot branch on
            raise ValueError(
                "under torch.compile, pass vocab_start and vocab_size (e.g. from fusedls.distributed.vocab_partition, "
                "called once outside the compiled code)"
            )
        part = vocab_partition(n_local, group, device=device)
        for name, given, found in (("vocab_start", vocab_start, part.start), ("vocab_size", vocab_size, part.total)):
            if given is not None and given != found:
                raise ValueError(f"{name}={given} but the local class counts of the ranks give {found}")
        vocab_start, vocab_size = part.start, part.total
    if vocab_start < 0 or vocab_start + n_local > vocab_size:
        raise ValueError(
            f"this rank's {n_local} classes from vocab_start={vocab_start} do not fit in vocab_size={vocab_size}"
        )
    if vocab_size == 0:
        raise ValueError("the vocabulary has 0 classes (on every rank): no class id can be valid")
    return vocab_start, vocab_size
