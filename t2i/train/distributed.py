"""torchrun integration: process group, rank info, DDP wrapping, rank-0-only side effects.

`torchrun --nproc_per_node N -m t2i.cli.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join
the process group (NCCL on CUDA, gloo on CPU). Without those variables everything is a no-op
and the world is one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # a training collective: a hang, past it


def init_world(device_type: str, backend: str | None = None,
               timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> World:
    """Join the torchrun process group if launched by torchrun: NCCL on CUDA, else gloo, unless
    `backend` is given; a collective not complete within `timeout` fails."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        backend = backend or ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timeout)
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World, requested: str) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def wrap(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP-wrap a module when running on several processes."""
    if not world.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def no_sync_of(module: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """Context that skips DDP's all-reduce on all but the last accumulation micro-batch."""
    inner = getattr(module, "_orig_mod", module)  # a compiled DDP module keeps DDP inside
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync
    return contextlib.nullcontext


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_flag(world: World, flag: bool) -> bool:
    """Rank 0's decision (e.g. stop) shared with every rank so no rank waits into a timeout.
    The flag travels on the process group's device (NCCL: this rank's CUDA device)."""
    if not world.distributed:
        return flag
    nccl = dist.get_backend() == dist.Backend.NCCL  # NCCL only moves CUDA tensors
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(world: World, obj: Any) -> Any:
    """Rank 0's value of a small picklable object (e.g. the run folder), on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order (a collective: every rank
    must call it at the same point, e.g. at a checkpoint step)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def all_sum(world: World, x: torch.Tensor) -> torch.Tensor:
    """Sum of a (CPU or device) tensor over ranks; used at log intervals only."""
    if not world.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_max(world: World, x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of a tensor over ranks (flags every rank must agree on: a stop
    signal, the non-finite count); used at the loop's checks only."""
    if not world.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
