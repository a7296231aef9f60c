"""The epoch fitter: one pass over the training loader, its step function chosen once.

Two step functions exist, picked from ``balancer.requirements`` when the fitter is built:

- :class:`TwoCallSteps`: ``loss()`` per micro-batch (scaled by ``1/grad_accum``), ``backward``, and
  ``before_step`` once per optimizer step after ``unscale_``; a short tail group of micro-batches is
  rescaled to a mean gradient like the full groups.
- :class:`OwnedSteps`: groups ``grad_accum`` micro-batches and hands them to ``balancer.train_step``.

Non-finite values (:class:`NonFiniteGuard`). Every micro-batch records, on the device and without a host
sync, whether each modality's unimodal logits, the fused logits and the loss are finite.

- ``on_nonfinite="stop"`` (the default) reads those flags only at check points: every
  ``CHECK_EVERY`` optimizer steps, before a checkpoint is written and at the end of the epoch (so a
  step costs no extra sync). The first non-finite micro-batch stops the run with a
  :class:`NonFiniteError` naming the epoch, the optimizer step, the micro-batch and what went
  non-finite first; no checkpoint ever holds non-finite parameters.
- ``"skip"`` decides before every optimizer step (one host sync, plus a norm of the gradients without
  AMP): a step whose loss, logits or gradients hold inf/NaN is dropped the way a ``GradScaler`` drops an
  overflow step (the gradients are set to NaN, ``before_step`` runs and, as the balancer contract
  requires of an overflow step, clears the balancer's pending statistics; the optimizer does not step),
  and counted. Under DDP the decision is all-reduced, so every rank skips the same steps.

With AMP, overflowing *gradients* are left to the ``GradScaler`` as always; a non-finite *loss* is not
an overflow (the forward pass is not scaled) and is handled as above. The epoch's progress lives in an
:class:`EpochState` that the trainer checkpoints between optimizer steps, so an epoch resumes mid-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..balancers import Balancer
from ..data.base import Batch, batch_to
from ..types import MultimodalOutput

CHECK_EVERY = 50
"""In ``stop`` mode, the non-finite flags are read every this many optimizer steps (and at checkpoints)."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run (the message names where and what)."""


class StatTotals:
    """Per-name sums and counts of the finite values of a balancer's recorded statistics, on the device.

    Each optimizer step adds its :meth:`~equimodal.Balancer.stat_values` in float64, name by name and in
    step order, so the sums equal those of adding each step's floats on the host one by one; they are read
    once (:meth:`read`), at the end of the epoch or for a checkpoint, instead of once per step.

    Args:
        sums: the sums so far (a resumed epoch's), by name.
        counts: the number of finite values in each sum.
    """

    def __init__(self, sums: dict[str, float], counts: dict[str, int]) -> None:
        self.names: list[str] = list(sums)
        self.start = [[float(sums[n]) for n in self.names], [float(counts[n]) for n in self.names]]
        self.totals: Tensor | None = None  # (2, names): sums, counts
        self.where: dict[tuple[str, ...], Tensor] = {}  # a step's names -> their columns

    def add(self, names: list[str], values: Tensor) -> None:
        """Add one step's values (a float64 vector, one per name) to the sums of the finite ones."""
        columns = self.where.get(tuple(names))
        if columns is None or columns.device != values.device:
            known = set(self.names)
            self.names += [n for n in names if n not in known]
            columns = torch.tensor([self.names.index(n) for n in names], device=values.device)
            self.where[tuple(names)] = columns
        if self.totals is None:
            self.totals = torch.tensor(self.start, dtype=torch.float64, device=values.device).view(2, -1)
        if self.totals.shape[1] < len(self.names) or self.totals.device != values.device:
            grown = torch.zeros(2, len(self.names), dtype=torch.float64, device=values.device)
            grown[:, : self.totals.shape[1]] = self.totals.to(values.device)
            self.totals = grown
        finite = torch.isfinite(values)
        self.totals[0].index_add_(0, columns, torch.where(finite, values, 0.0))
        self.totals[1].index_add_(0, columns, finite.to(torch.float64))

    def read(self) -> tuple[dict[str, float], dict[str, int]]:
        """The sums and counts by name (one host read); names without a finite value are left out."""
        if self.totals is None:
            return {n: s for n, s in zip(self.names, self.start[0], strict=True)}, {
                n: int(c) for n, c in zip(self.names, self.start[1], strict=True)
            }
        sums, counts = self.totals.tolist()
        kept = [(n, s, int(c)) for n, s, c in zip(self.names, sums, counts, strict=True) if c > 0]
        return {n: s for n, s, _ in kept}, {n: c for n, _, c in kept}


@dataclass
class EpochState:
    """An epoch's progress: micro-batches consumed, optimizer steps, loss sum, statistic sums, skips.

    Everything in :meth:`to_dict` is plain Python, so it goes into a checkpoint as is. The loss of the
    latest micro-batches is summed on the device (``pending_loss``) and folded into ``loss_sum`` by
    :meth:`settle`, which the trainer calls only when it needs the figure (a checkpoint, a log line); the
    balancer's statistics are summed on the device too (:class:`StatTotals`) and read into ``stat_sums``
    and ``stat_counts`` by :meth:`settle_stats`.
    """

    batches: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    stat_sums: dict[str, float] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    correct: list[float] = field(default_factory=list)
    seen: int = 0
    step_rows: list[dict[str, float]] = field(default_factory=list)
    pending_loss: Tensor | float = field(default=0.0, repr=False)
    pending_correct: Tensor | None = field(default=None, repr=False)
    stat_totals: StatTotals | None = field(default=None, repr=False)

    def add_stats(self, names: list[str], values: Tensor | None) -> None:
        """Add one step's balancer statistics (non-finite values are left out of the sums; no host read)."""
        if values is None:
            return
        if self.stat_totals is None:
            self.stat_totals = StatTotals(self.stat_sums, self.stat_counts)
        self.stat_totals.add(names, values)

    def settle_stats(self) -> None:
        """Read the device-side statistic sums into ``stat_sums`` and ``stat_counts`` (one host read)."""
        if self.stat_totals is not None:
            self.stat_sums, self.stat_counts = self.stat_totals.read()

    def settle(self) -> None:
        """Fold the device-side loss sum and correct counts into the plain fields (one host sync)."""
        if isinstance(self.pending_loss, Tensor):
            self.loss_sum += float(self.pending_loss)
        self.pending_loss = 0.0
        if self.pending_correct is not None:
            counts = self.pending_correct.tolist()
            self.correct = [a + b for a, b in zip(self.correct or [0.0] * len(counts), counts, strict=True)]
            self.pending_correct = None

    def count_correct(self, out: MultimodalOutput, y: Tensor, modalities: list[str]) -> None:
        """Add this micro-batch's correct predictions, fused then per modality (on the device, no sync)."""
        with torch.no_grad():
            logits = torch.stack(
                [out.logits.detach(), *(out.unimodal_logits[m].detach() for m in modalities)]
            )
            hits = (logits.argmax(-1) == y).sum(1).float()
        self.pending_correct = hits if self.pending_correct is None else self.pending_correct + hits
        self.seen += int(y.shape[0])

    def train_accuracy(self, modalities: list[str]) -> dict[str, float]:
        """The running training accuracy of the epoch, fused and per modality (``{}`` when not counted)."""
        self.settle()
        if not self.correct or not self.seen:
            return {}
        acc = [c / self.seen for c in self.correct]
        return {
            "train_acc": acc[0],
            **{f"train_acc_{m}": a for m, a in zip(modalities, acc[1:], strict=True)},
        }

    def mean_stats(self) -> dict[str, float]:
        """The epoch's mean of each balancer statistic over its finite values (one host read)."""
        self.settle_stats()
        return {k: v / self.stat_counts[k] for k, v in self.stat_sums.items()}

    @property
    def mean_loss(self) -> float:
        self.settle()
        return self.loss_sum / max(self.batches, 1)

    def to_dict(self) -> dict[str, Any]:
        """The checkpointable part (the pending loss and the statistic sums settled first)."""
        self.settle()
        self.settle_stats()
        return {
            "batches": self.batches, "steps": self.steps, "loss_sum": self.loss_sum, "skipped": self.skipped,
            "stat_sums": dict(self.stat_sums), "stat_counts": dict(self.stat_counts), "seconds": self.seconds,
            "correct": list(self.correct), "seen": self.seen, "step_rows": list(self.step_rows),
        }  # fmt: skip


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
    on_nonfinite: str = "stop"


class NonFiniteGuard:
    """Device-side finiteness records of each micro-batch, read only when a decision needs them.

    Each recorded micro-batch is a row of largest magnitudes ``[unimodal logits per modality..., fused
    logits, loss]`` (one fused ``_foreach_norm(ord=inf)``: NaN and inf propagate, nothing can overflow)
    with its position (epoch, optimizer step, micro-batch).
    """

    def __init__(self, modalities: list[str]) -> None:
        self.modalities = modalities
        self.rows: list[Tensor] = []
        self.where: list[tuple[int, int, int]] = []

    def record(self, out: MultimodalOutput | None, loss: Tensor, where: tuple[int, int, int]) -> None:
        """Queue this micro-batch's largest magnitudes (finite exactly when every value is; no host sync)."""
        loss = loss.detach().reshape(1)
        if out is None:
            tensors = [loss.new_zeros(1)] * (len(self.modalities) + 1) + [loss]
        else:
            tensors = [out.unimodal_logits[m].detach() for m in self.modalities] + [out.logits.detach(), loss]
        self.rows.append(torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).float())
        self.where.append(where)

    def first_bad(self, extra_bad: bool = False) -> str | None:
        """Read the queued flags (one host sync, all-reduced under DDP) and clear them.

        Returns a description of the first non-finite micro-batch, or ``None`` when all were finite and
        ``extra_bad`` (e.g. a gradient check) is false.
        """
        rows, where = self.rows, self.where
        self.rows, self.where = [], []
        if not rows:
            return "a gradient holds inf/NaN (the loss was finite)" if extra_bad else None
        table = torch.isfinite(torch.stack(rows)).float()  # 1: finite
        local_bad = bool((table < 1).any()) or extra_bad
        any_bad = local_bad
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(local_bad)], device=table.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            any_bad = bool(flag.item())
        if not any_bad:
            return None
        if not bool((table < 1).any()):
            why = "a gradient holds inf/NaN (the loss was finite)" if extra_bad else "non-finite values"
            return f"{why} on {'this' if extra_bad else 'another'} process"
        i = int((table < 1).any(1).float().argmax())
        epoch, step, micro = where[i]
        return f"epoch {epoch}, optimizer step {step + 1} (micro-batch {micro + 1}): {self._what(table[i])}"

    def _what(self, row: Tensor) -> str:
        bad = [
            m for m, ok in zip(self.modalities, row[: len(self.modalities)].tolist(), strict=True) if ok < 1
        ]
        if bad:
            return f"the unimodal logits of modality {bad[0]!r} hold non-finite values"
        if row[-2] < 1:
            return "the fused logits hold non-finite values (every modality's unimodal logits are finite)"
        return "the loss is not finite (the logits are finite)"

    def clear(self) -> None:
        self.rows, self.where = [], []


def grads_nonfinite(params: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether any of these gradients holds inf/NaN (no host sync)."""
    if not params:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(params))).all()


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds inf/NaN, or ``None`` (syncs per parameter)."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None


def params_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter of ``model`` is finite (one host sync)."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    return not params or bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())


class _Steps:
    """The shared part of both step functions: the epoch bookkeeping and the non-finite policy."""

    def __init__(self, ctx: StepContext, state: EpochState, epoch: int) -> None:
        self.ctx, self.state, self.epoch = ctx, state, epoch
        self.guard = NonFiniteGuard(list(ctx.balancer.modalities))
        self.micro = 0

    def where(self) -> tuple[int, int, int]:
        return self.epoch, self.state.steps + self.state.skipped, self.micro

    def check(self) -> None:
        """``stop`` mode: raise :class:`NonFiniteError` if a queued micro-batch was not finite."""
        what = self.guard.first_bad()
        if what is not None:
            raise NonFiniteError(
                f"Non-finite values at {what}. Lower optim.lr, check the inputs for inf/NaN, or set "
                "train.on_nonfinite=skip to skip such steps (they are counted in metrics.csv)."
            )

    def params(self) -> list[Tensor]:
        return [p.grad for g in self.ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]


class TwoCallSteps(_Steps):
    """``loss()`` per micro-batch, ``before_step()`` once per optimizer step."""

    def __init__(self, ctx: StepContext, state: EpochState, epoch: int) -> None:
        super().__init__(ctx, state, epoch)
        # Chosen once: without AMP neither autocast nor the (disabled) scaler runs per step.
        amp = ctx.use_amp
        self.autocast = (lambda: torch.autocast(ctx.device.type)) if amp else contextlib.nullcontext
        self.scale = ctx.scaler.scale if amp else (lambda loss: loss)

    def micro_step(self, batch: Batch, y: Tensor) -> tuple[Tensor, bool]:
        """One micro-batch; returns its (detached) loss and whether an optimizer step ended."""
        c = self.ctx
        with self.autocast():
            out = c.train_model(batch)
            loss = c.balancer.loss(out, y, batch=batch)
        self.guard.record(out, loss, self.where())
        self.state.count_correct(out, y, self.guard.modalities)
        self.scale(loss / c.grad_accum if c.grad_accum > 1 else loss).backward()
        self.micro += 1
        if self.micro == c.grad_accum:
            self._optimizer_step()
            return loss.detach().float(), True
        return loss.detach().float(), False

    def flush(self) -> bool:
        """Step on a short tail group at the end of the epoch; returns whether a step ran."""
        if not self.micro:
            return False
        self._optimizer_step()
        return True

    def _skip_this_step(self) -> bool:
        """``skip`` mode: whether this step's loss, logits or (without AMP) gradients hold inf/NaN."""
        grads_bad = False if self.ctx.use_amp else bool(grads_nonfinite(self.params()))
        what = self.guard.first_bad(extra_bad=grads_bad)
        return what is not None

    def _optimizer_step(self) -> None:
        c = self.ctx
        c.scaler.unscale_(c.optimizer)
        micro, self.micro = self.micro, 0
        if c.on_nonfinite == "skip" and self._skip_this_step():
            grads = self.params()
            if grads:  # what an AMP overflow step looks like to the balancer: it clears its pending state
                torch._foreach_mul_(grads, float("nan"))
            c.balancer.before_step()
            c.optimizer.zero_grad(set_to_none=True)
            if c.use_amp:
                c.scaler.update()
            self.state.skipped += 1
            return
        if micro != c.grad_accum:
            torch._foreach_mul_(self.params(), c.grad_accum / micro)
        c.balancer.before_step()
        c.scaler.step(c.optimizer)
        c.scaler.update()
        c.optimizer.zero_grad(set_to_none=True)
        self.state.steps += 1
        self.state.add_stats(*c.balancer.stat_values())


class OwnedSteps(_Steps):
    """Groups ``grad_accum`` micro-batches per ``balancer.train_step`` call (the balancer owns the step).

    The owned step has updated the parameters by the time its loss is seen, so a non-finite step cannot
    be skipped (``on_nonfinite="skip"`` is refused for such balancers when the run is built).
    """

    def __init__(self, ctx: StepContext, state: EpochState, epoch: int) -> None:
        super().__init__(ctx, state, epoch)
        self.group: list[tuple[Batch, Tensor]] = []

    def micro_step(self, batch: Batch, y: Tensor) -> tuple[Tensor | None, bool]:
        self.group.append((batch, y))
        return (self._step(), True) if len(self.group) == self.ctx.grad_accum else (None, False)

    def flush(self) -> bool:
        if not self.group:
            return False
        self.state.pending_loss = self.state.pending_loss + self._step()
        return True

    def _step(self) -> Tensor:
        """One ``train_step``; returns the sum of the group's mean losses (one per micro-batch)."""
        inputs = {k: torch.cat([b[k] for b, _ in self.group]) for k in self.group[0][0]}
        target = torch.cat([y for _, y in self.group])
        size = len(self.group)
        self.micro = size - 1
        loss = self.ctx.balancer.train_step(inputs, target, self.ctx.optimizer, micro_batches=size) * size
        self.guard.record(None, loss, self.where())
        self.group.clear()
        self.micro = 0
        self.state.steps += 1
        self.state.add_stats(*self.ctx.balancer.stat_values())
        return loss.detach().float()


class EpochFitter:
    """Runs one training epoch with the step function chosen once for the balancer."""

    def __init__(self, ctx: StepContext) -> None:
        if ctx.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', found {ctx.on_nonfinite!r}.")
        self.ctx = ctx
        self.steps_cls = OwnedSteps if ctx.balancer.requirements.own_step else TwoCallSteps

    def fit(
        self,
        loader: Iterable[tuple[Batch, Tensor]],
        state: EpochState | None = None,
        *,
        epoch: int = 0,
        after_step: Callable[[EpochState, Callable[[], None]], Any] | None = None,
    ) -> EpochState:
        """One epoch (or its rest, continuing ``state``) over ``loader``; returns the epoch's state.

        ``after_step(state, check)`` runs after every optimizer step, between steps; the trainer
        checkpoints, logs and stops there, and calls ``check()`` first whenever it is about to write a
        checkpoint (in ``stop`` mode it raises :class:`NonFiniteError` on a queued non-finite
        micro-batch). The epoch ends with a check too.
        """
        state = state if state is not None else EpochState()
        steps = self.steps_cls(self.ctx, state, epoch)
        stop_mode = self.ctx.on_nonfinite == "stop"
        total: Tensor | float = 0.0  # summed on the device: no host sync per step
        self.ctx.train_model.train()

        def stepped() -> None:
            nonlocal total
            state.pending_loss, total = state.pending_loss + total, 0.0
            if stop_mode and (state.steps % CHECK_EVERY == 0):
                steps.check()
            if after_step is not None:
                after_step(state, steps.check if stop_mode else lambda: None)

        for batch, y in loader:
            loss, ended = steps.micro_step(
                batch_to(batch, self.ctx.device), y.to(self.ctx.device, non_blocking=True)
            )
            state.batches += 1
            if loss is not None:
                total = total + loss
            if ended:
                stepped()
        if steps.flush():
            stepped()
        state.pending_loss = state.pending_loss + total
        if stop_mode:
            steps.check()
        return state
