"""Several processes under ``torchrun``: who is who, sharding, and the reductions adalog needs.

``torchrun --nproc_per_node=N [--nnodes=M ...] -m adalog.cli CMD ...`` starts N processes per
node with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`join` turns
them into a process group (NCCL when the work is on CUDA, gloo on the CPU) and every helper
here is a no-op for a single process, so pipelines call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from adalog.devices import resolve_device
from adalog.errors import ConfigError

#: How long a rank waits at a collective for the others (e.g. while rank 0 calibrates an
#: ablation's shared base): minutes, from ADALOG_DIST_TIMEOUT_MIN (default 12 hours).
TIMEOUT_ENV = "ADALOG_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: Where collectives place their tensors: CUDA for NCCL, the CPU for gloo.
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from exc


def rank_device(device: str | torch.device = "auto") -> torch.device:
    """The device this rank works on: ``auto`` and a bare ``cuda`` become ``cuda:LOCAL_RANK``
    under torchrun (one GPU per process), anything else as :func:`resolve_device` reads it."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None and launched_world_size() > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                "visible); start at most one process per GPU"
            )
        resolved = torch.device("cuda", local_rank)
    return resolved


def join(device: torch.device) -> Ranks:
    """Join the job's process group (created once per process) and say where this rank stands.
    Outside torchrun: rank 0 of 1, nothing initialised."""
    world_size = launched_world_size()
    if world_size <= 1:
        return Ranks()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_ENV, "720"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    elif dist.get_backend() != backend:
        raise ConfigError(
            f"the process group runs {dist.get_backend()}, but work on {device} needs {backend}"
        )
    comm = device if backend == "nccl" else torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, comm)


def leave() -> None:
    """Tear the process group down (at the end of a command), if one was made."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ranks: Ranks) -> range:
    """This rank's items of ``n``: every world_size-th from its rank, so the shards cover each
    item exactly once (no padding duplicates) and differ in size by at most one."""
    return range(ranks.rank, n, ranks.world_size)


def sum_across(values: list[float], ranks: Ranks, dtype: torch.dtype = torch.int64) -> list:
    """Element-wise sums of ``values`` over the ranks (int64 by default: exact counts)."""
    if not ranks.active:
        return list(values)
    tensor = torch.tensor(values, dtype=dtype, device=ranks.comm_device)
    sum_tensors_across_([tensor], ranks)
    return tensor.tolist()


def max_across(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise maxima of ``values`` over the ranks (e.g. the slowest rank's wall time)."""
    if not ranks.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.comm_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_text(text: str, ranks: Ranks) -> str:
    """Rank 0's ``text`` on every rank."""
    if not ranks.active:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here."""
    if ranks.active:
        if ranks.comm_device.type == "cuda":
            dist.barrier(device_ids=[ranks.comm_device.index])
        else:
            dist.barrier()


def sum_tensors_across_(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Replace each tensor by its sum over the ranks, in place, in one collective per dtype
    (e.g. the gradients of one optimisation step)."""
    if not ranks.active:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group]).to(ranks.comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(part.view_as(tensor))


def gather_text(text: str, ranks: Ranks) -> list[str]:
    """Every rank's ``text``, in rank order."""
    if not ranks.active:
        return [text]
    box: list[str] = [""] * ranks.world_size
    dist.all_gather_object(box, text)
    return box
