"""The timed training step that the overhead benchmarks share (``amss_overhead.py``, ``before_step.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import equimodal as em


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA), so that a wall-clock reading covers it; CPU: nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_step(
    model: nn.Module,
    balancer: em.Balancer,
    opt: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    y: Tensor,
    sync: Callable[[], None],
    *,
    masking: Callable[[], object] | None = None,
    update: bool = True,
) -> tuple[float, float]:
    """One training step: ``(whole step, the before_step part)`` in seconds.

    ``masking`` replaces ``balancer.before_step`` (a naive masking loop to compare with); ``update=False``
    leaves out the optimizer step.
    """
    sync()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    balancer.loss(model(batch), y).backward()
    sync()
    t1 = time.perf_counter()
    (masking or balancer.before_step)()
    sync()
    t2 = time.perf_counter()
    if update:
        opt.step()
        sync()
    return time.perf_counter() - t0, t2 - t1
