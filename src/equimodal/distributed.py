"""Helpers that keep balancers identical across DDP ranks (no-ops when not distributed)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Reduce = Literal["sum", "mean", "max", "min"]
REDUCE_OPS: tuple[str, ...] = ("sum", "mean", "max", "min")


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


def all_reduce_flat(tensors: Sequence[Tensor], reduce: Reduce = "sum") -> list[Tensor]:
    """Reduce several tensors of one dtype and device over all ranks in ONE flat collective.

    Args:
        tensors: the tensors (any shapes); they are not modified.
        reduce: ``"sum"``, ``"mean"`` (the sum divided by the number of ranks), ``"max"`` or ``"min"``.

    Returns:
        The reduced tensors, of the given shapes; on a single process, the tensors themselves.
    """
    if reduce not in REDUCE_OPS:
        raise ValueError(f"reduce must be one of {REDUCE_OPS}, found {reduce!r}.")
    if not tensors or not is_distributed():
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(reduce, dist.ReduceOp.SUM)
    dist.all_reduce(flat, op=op)
    if reduce == "mean":
        flat.div_(dist.get_world_size())
    return [
        part.view_as(t) for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True)
    ]


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the existing gradients of ``params`` over DDP ranks in one flat all-reduce (in place)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and is_distributed():
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


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
