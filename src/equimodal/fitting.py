"""The epoch fitter: one training epoch through a balancer's calls, its step function chosen once.

Two step functions exist, picked from ``balancer.requirements`` when the fitter is built:

- :class:`TwoCallSteps`: ``loss`` per micro-batch (under autocast, scaled by the ``GradScaler``),
  ``before_step`` once per optimizer step after ``unscale_``; a short tail group of micro-batches is
  rescaled to a mean gradient like the full groups.
- :class:`OwnedSteps`: groups ``grad_accum`` micro-batches and hands them to ``balancer.train_step``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .balancers import Balancer
from .data.base import Batch, batch_to


class StatsMeter:
    """Means of the balancer's per-step statistics over an epoch (non-finite values are left out)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


@dataclass
class StepContext:
    """What a step function needs: the model (DDP-wrapped for training), balancer, optimizer, scaler."""

    train_model: nn.Module
    balancer: Balancer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_accum: int
    use_amp: bool
    device: torch.device


class TwoCallSteps:
    """``loss()`` per micro-batch, ``before_step()`` once per optimizer step."""

    def __init__(self, ctx: StepContext, meter: StatsMeter) -> None:
        self.ctx, self.meter, self.micro = ctx, meter, 0
        # Chosen once: without AMP neither autocast nor the (disabled) scaler runs per step.
        amp = ctx.use_amp
        self.autocast = (lambda: torch.autocast(ctx.device.type)) if amp else contextlib.nullcontext
        self.scale = ctx.scaler.scale if amp else (lambda loss: loss)

    def micro_step(self, batch: Batch, y: Tensor) -> Tensor:
        """Forward, loss and backward of one micro-batch; steps the optimizer when the group is full."""
        c = self.ctx
        with self.autocast():
            loss = c.balancer.loss(c.train_model(batch), y, batch=batch)
        self.scale(loss / c.grad_accum if c.grad_accum > 1 else loss).backward()
        self.micro += 1
        if self.micro == c.grad_accum:
            self._optimizer_step()
        return loss.detach().float()

    def flush(self) -> Tensor | None:
        """Step on a short tail group at the end of the epoch."""
        if self.micro:
            self._optimizer_step()
        return None

    def _optimizer_step(self) -> None:
        c = self.ctx
        c.scaler.unscale_(c.optimizer)
        if self.micro != c.grad_accum:
            grads = [p.grad for g in c.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, c.grad_accum / self.micro)
        c.balancer.before_step()
        c.scaler.step(c.optimizer)
        c.scaler.update()
        c.optimizer.zero_grad(set_to_none=True)
        self.micro = 0
        self.meter.add(c.balancer.stats())


class OwnedSteps:
    """Groups ``grad_accum`` micro-batches per ``balancer.train_step`` call (the balancer owns the step)."""

    def __init__(self, ctx: StepContext, meter: StatsMeter) -> None:
        self.ctx, self.meter = ctx, meter
        self.group: list[tuple[Batch, Tensor]] = []

    def micro_step(self, batch: Batch, y: Tensor) -> Tensor | None:
        self.group.append((batch, y))
        return self._step() if len(self.group) == self.ctx.grad_accum else None

    def flush(self) -> Tensor | None:
        return self._step() if self.group else None

    def _step(self) -> Tensor:
        """One ``train_step``; returns the sum of the group's mean losses (one per micro-batch)."""
        inputs = {k: torch.cat([b[k] for b, _ in self.group]) for k in self.group[0][0]}
        target = torch.cat([y for _, y in self.group])
        size = len(self.group)
        loss = self.ctx.balancer.train_step(inputs, target, self.ctx.optimizer, micro_batches=size) * size
        self.group.clear()
        self.meter.add(self.ctx.balancer.stats())
        return loss.detach().float()


class EpochFitter:
    """Runs training epochs; the step function (:class:`TwoCallSteps` or :class:`OwnedSteps`) is fixed here."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.steps_cls = OwnedSteps if ctx.balancer.requirements.own_step else TwoCallSteps

    def fit(self, loader: Iterable[tuple[Batch, Tensor]]) -> tuple[float, dict[str, float]]:
        """One epoch over ``loader``; returns the mean micro-batch loss and the mean per-step statistics."""
        meter = StatsMeter()
        steps = self.steps_cls(self.ctx, meter)
        total: Tensor | float = 0.0  # summed on the device: no host sync per step
        n_batches = 0
        self.ctx.train_model.train()
        for batch, y in loader:
            loss = steps.micro_step(
                batch_to(batch, self.ctx.device), y.to(self.ctx.device, non_blocking=True)
            )
            n_batches += 1
            if loss is not None:
                total = total + loss
        tail = steps.flush()
        if tail is not None:
            total = total + tail
        return float(total) / max(n_batches, 1), meter.means()
