"""Helpers that keep balancers identical across DDP ranks (no-ops when not distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over all ranks in place (and return it); identity on a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (and return it); identity on a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers of ``module`` (e.g. batch-norm running statistics) to every rank.

    DDP broadcasts rank 0's buffers at the start of each training forward, after which every rank updates
    them with its own shard; this makes them equal again (a no-op on a single process).
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded identically on every rank, so random draws agree across DDP ranks."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
