"""torchrun / DDP plumbing: one process works too (world size 1, no process group)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_shards.devices import resolve_device  # one device rule for both stages


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE; nccl on GPUs, gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device)          # honours LOCAL_RANK like cache-teacher
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, world_size, dev)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Stack one same-shaped tensor per rank -> (world_size, *t.shape), on the CPU."""
    if not ctx.distributed:
        return t.unsqueeze(0).cpu()
    t = t.to(ctx.device)
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t)
    return torch.stack(parts).cpu()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
