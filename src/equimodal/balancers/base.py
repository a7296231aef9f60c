"""The ``Balancer`` base class: an optimizer-shaped object whose public calls are template methods.

A balancer is built from the model (like an optimizer), called once per micro-batch through
:meth:`Balancer.loss` (which replaces ``F.cross_entropy``) and once per optimizer step through
:meth:`Balancer.before_step` (the point where ``clip_grad_norm_`` would go: gradients accumulated,
unscaled, not yet clipped). It is not an ``nn.Module``; its state round-trips through
``state_dict``/``load_state_dict``.

The base class owns every public call: it validates the call, applies the epoch window and adds the
auxiliary-head term, so that outside its window every balancer is exactly joint training by
construction. A method supplies only what is its own, by overriding hooks that are called while it is
active:

=========================  ==============================  =============================================
public call (a driver)     hook (a method overrides)       what the hook supplies
=========================  ==============================  =============================================
``loss(out, y, batch=)``   :meth:`observe`                 per-micro-batch statistics (no return value)
``loss(out, y, batch=)``   :meth:`objective`               the training objective (default: fused CE)
``before_step()``          :meth:`adjust_gradients`        in-place edits of ``.grad``
``prepare_epoch(data)``    :meth:`on_epoch_start`          epoch-level work over train / held-out data
``train_step(b, y, opt)``  :meth:`own_step`                a whole optimisation step of its own
``predict(out)``           :meth:`fused_prediction`        evaluation logits (default: fused logits)
``predict_unimodal(out)``  :meth:`unimodal_prediction`     per-modality evaluation logits
=========================  ==============================  =============================================

What a driver must do is derived from what a balancer overrides (as Lightning checks overridden hooks)
and exposed in one place, :attr:`Balancer.requirements`. Every public call checks it and raises
:class:`DriverError` at the first wrong call, naming the call that is needed, so no driver (a user's
loop, the reference trainer, Lightning) can silently run a different method than the one named:

- a balancer that overrides :meth:`own_step` must be driven by :meth:`train_step`;
- one that overrides :meth:`on_epoch_start` needs :meth:`prepare_epoch` at every epoch start (with
  ``EpochData.heldout`` when ``heldout_fraction > 0``);
- one with a bounded epoch window, epoch data, or its own :meth:`set_epoch` needs :meth:`set_epoch`;
- one with ``needs_batch = True`` needs ``loss(..., batch=inputs)``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_mean, is_distributed, make_generator
from ..types import MultimodalOutput, check_output, modality_names
from .epoch_data import EpochData

Batch = Mapping[str, Tensor]
log = logging.getLogger(__name__)


class DriverError(RuntimeError):
    """A balancer was driven without a call it needs (the message names the call)."""


@dataclass(frozen=True)
class Requirements:
    """What a driver must do for a balancer, derived from the hooks it overrides.

    Attributes:
        own_step: drive it with ``train_step(batch, labels, optimizer)``, not ``loss()``/``before_step()``.
        epoch_data: call ``prepare_epoch(EpochData(...))`` at each epoch start, after ``set_epoch``.
        set_epoch: call ``set_epoch(epoch)`` at each epoch start.
        batch: pass the model inputs, ``loss(out, labels, batch=inputs)``.
        heldout_fraction: ``EpochData.heldout`` must hold this fraction of train, carved out of it.
        parameters: ``balancer.parameters()`` must be in the optimizer.
        unused_parameters: some model parameters get no gradient (DDP's ``find_unused_parameters``).
    """

    own_step: bool = False
    epoch_data: bool = False
    set_epoch: bool = False
    batch: bool = False
    heldout_fraction: float = 0.0
    parameters: bool = False
    unused_parameters: bool = False

    def describe(self) -> list[str]:
        """One line per call a hand-written loop must make besides the two calls."""
        lines = []
        if self.own_step:
            lines.append("train_step(batch, labels, optimizer) instead of loss()/before_step()")
        if self.set_epoch:
            lines.append("set_epoch(epoch) at the start of each epoch")
        if self.epoch_data:
            held = f" with heldout= {self.heldout_fraction:.0%} of train" if self.heldout_fraction else ""
            lines.append(f"prepare_epoch(EpochData(...){held}) after each set_epoch")
        if self.batch:
            lines.append("loss(out, labels, batch=inputs)")
        if self.parameters:
            lines.append("the optimizer holds balancer.parameters()")
        return lines


_ADAPTIVE = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam")
    if hasattr(torch.optim, n)
)
_ADAPTIVE_NAME = re.compile(r"adam|rmsprop|adagrad|adadelta|adafactor|lamb|lion|adabelief|sophia", re.I)


def is_adaptive_optimizer(optimizer: object) -> bool:
    """Whether ``optimizer`` normalises each update by a running statistic of its own gradients.

    True for torch's Adam family, RMSprop, Adagrad and Adadelta, and for any optimizer whose class
    name or parameter groups look Adam-like (a ``betas`` entry, e.g. fused or 8-bit Adam, Lion, LAMB).
    Multiplying a gradient by a slowly varying factor barely changes such an update.
    """
    if isinstance(optimizer, _ADAPTIVE) or _ADAPTIVE_NAME.search(type(optimizer).__name__):
        return True
    groups = getattr(optimizer, "param_groups", None) or []
    return any(isinstance(g, dict) and "betas" in g for g in groups)


class Balancer:
    """Base class of every balancer; on its own it is plain joint training (CE on fused logits).

    Args:
        model: a model satisfying the contract (``model.encoders`` ModuleDict; forward returns
            ``MultimodalOutput``).
        start_epoch: first epoch (inclusive) in which the method acts.
        end_epoch: last epoch (inclusive) in which it acts; ``None`` means no end.
        seed: seed of the balancer's random generator (identical on all DDP ranks).

    Class attributes a method may set (read only by :attr:`requirements`): ``needs_batch`` (its hooks
    read the model inputs), ``heldout_fraction`` (its epoch data needs a held-out part of train; may be
    set per instance), ``unused_parameters`` (some parameters get no gradient). One more is a
    documented property, not a requirement: ``micro_batch_statistics`` (its loss depends on statistics
    of each micro-batch, so with gradient accumulation each micro-batch decides for itself, as in PMR).
    ``name`` is set by :func:`~equimodal.register_balancer`. ``scales_gradients`` (the method acts by
    multiplying gradients, as OGM, AGM and MSLR do) makes :meth:`check_optimizer` warn under adaptive
    optimizers, which cancel most of such a factor.
    """

    name: ClassVar[str] = "base"
    needs_batch: ClassVar[bool] = False
    micro_batch_statistics: ClassVar[bool] = False
    scales_gradients: ClassVar[bool] = False
    heldout_fraction: float = 0.0
    unused_parameters: bool = False

    def __init__(
        self, model: nn.Module, *, start_epoch: int = 0, end_epoch: int | None = None, seed: int = 0
    ) -> None:
        self.model = model
        self.modalities: list[str] = modality_names(model)
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, found {start_epoch}.")
        if end_epoch is not None and end_epoch < start_epoch:
            raise ValueError(
                f"end_epoch ({end_epoch}) must be >= start_epoch ({start_epoch}), or None for no end."
            )
        self.start_epoch = int(start_epoch)
        self.end_epoch = None if end_epoch is None else int(end_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.num_steps = 0
        self._stats: dict[str, float] = {}
        self._gen: torch.Generator | None = None
        self._pending_gen_state: Tensor | None = None
        self._epoch_set = False
        self._prepared_epoch: int | None = None
        self._optimizer_warned = False

    # ------------------------------------------------------------------ what a driver must do
    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this class overrides the base class's ``hook`` (how requirements are derived)."""
        return getattr(cls, hook) is not getattr(Balancer, hook)

    @property
    def uses_epoch_data(self) -> bool:
        """Whether :meth:`on_epoch_start` does work (a subclass may narrow this per instance)."""
        return self.overrides("on_epoch_start")

    @property
    def requirements(self) -> Requirements:
        """What a driver must do for this balancer (see :class:`Requirements`)."""
        epoch_data = self.uses_epoch_data
        bounded = self.start_epoch > 0 or self.end_epoch is not None
        return Requirements(
            own_step=self.overrides("own_step"),
            epoch_data=epoch_data,
            set_epoch=bounded or epoch_data or self.overrides("set_epoch"),
            batch=bool(self.needs_batch),
            heldout_fraction=float(self.heldout_fraction) if epoch_data else 0.0,
            parameters=any(True for _ in self.parameters()),
            unused_parameters=bool(self.unused_parameters),
        )

    def _check_driver(self, call: str, *, batch: object = True) -> None:
        """Raise :class:`DriverError` when ``call`` is made without what the balancer needs."""
        req = self.requirements
        if req.own_step and call != "train_step()":
            raise DriverError(
                f"{self.name} runs its own step: call balancer.train_step(batch, labels, optimizer) instead "
                f"of loss()/before_step() (found a call to {call})."
            )
        if req.set_epoch and not self._epoch_set:
            why = (
                f"acts in epochs {self.start_epoch}-{'end' if self.end_epoch is None else self.end_epoch} only"
                if self.start_epoch > 0 or self.end_epoch is not None
                else "works per epoch"
            )
            raise DriverError(
                f"{self.name} {why}: call balancer.set_epoch(epoch) at the start of every epoch, before the "
                f"first {call}."
            )
        if req.epoch_data and self._prepared_epoch != self.epoch:
            held = " and heldout= a part of train (never val/test)" if req.heldout_fraction else ""
            raise DriverError(
                f"{self.name} needs prepare_epoch(EpochData(train=...{held}, device=...)) at each epoch start, "
                f"after set_epoch(epoch); found {call} in epoch {self.epoch} without it."
            )
        if req.batch and batch is None:
            raise DriverError(
                f"{self.name} needs the model inputs: call balancer.loss(out, labels, batch=batch) (found "
                "batch=None)."
            )

    # ------------------------------------------------------------------ the two calls
    def loss(self, out: MultimodalOutput, target: Tensor, *, batch: Batch | None = None) -> Tensor:
        """Return the training loss for one micro-batch (replaces ``F.cross_entropy``).

        Validates the output and labels; outside the epoch window it is the fused CE (plus the
        auxiliary-head term); inside, :meth:`observe` records statistics and :meth:`objective` gives
        the loss. ``batch`` (the model's inputs) is needed by balancers with ``needs_batch``.
        """
        self._check_driver("loss()", batch=batch)
        return self._loss(out, target, batch)

    def _loss(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        check_output(out, self.modalities, target)
        if not self.active:
            return F.cross_entropy(out.logits, target) + Balancer.auxiliary_loss(self, out, target)
        self.observe(out, target, batch)
        return self.objective(out, target, batch) + self.auxiliary_loss(out, target)

    def before_step(self) -> None:
        """Edit ``.grad`` in place once per optimizer step (after backward/unscale, before step)."""
        self._check_driver("before_step()")
        self._step_gradients()

    def _step_gradients(self) -> None:
        self.num_steps += 1
        if self.active:
            self.adjust_gradients()

    def train_step(
        self, batch: Batch, target: Tensor, optimizer: torch.optim.Optimizer, *, micro_batches: int = 1
    ) -> Tensor:
        """Run one whole optimisation step on ``batch``; works for every balancer.

        Balancers that own their step run :meth:`own_step`; the others run the two calls (forward,
        :meth:`loss`, backward, :meth:`before_step`, ``optimizer.step()``). ``micro_batches`` splits the
        batch into that many chunks whose gradients are accumulated, each weighted by its share of the
        samples, before the step (the update of the whole batch, but for batch-norm statistics). Gradients are zeroed before and after. Under DDP (the model here is not
        wrapped) gradients are averaged over ranks before they are adjusted. Returns the mean loss.
        """
        self._check_driver("train_step()")
        self.check_optimizer(optimizer)
        if not (isinstance(micro_batches, int) and micro_batches >= 1):
            raise ValueError(f"micro_batches must be a positive integer, found {micro_batches!r}.")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in held for p in self.parameters()):
            raise DriverError(
                f"{self.name} trains parameters of its own that the optimizer does not hold. Build the "
                "optimizer with `torch.optim.SGD([*model.parameters(), *balancer.parameters()], ...)`."
            )
        if self.active and self.requirements.own_step:
            loss = self.own_step(batch, target, optimizer, micro_batches)
            self.num_steps += 1
            return loss
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for chunk, y in split_batch(batch, target, micro_batches):
            loss = self._loss(self.model(chunk), y, chunk) * (y.shape[0] / target.shape[0])
            loss.backward()
            losses.append(loss.detach())
        if is_distributed():
            all_reduce_grads([p for g in optimizer.param_groups for p in g["params"]])
        self._step_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).sum()

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Warn once (``RuntimeWarning``) when a gradient-scaling method meets an adaptive optimizer.

        Adam-type optimizers divide each parameter's update by a running RMS of its own gradients, so a
        factor that changes slowly between steps largely cancels (``benchmarks/adam_modulation.py``
        measures how much). Returns whether the warning applies. :meth:`train_step` calls it; the
        reference trainer and the Lightning callback call it once after the optimizer is built, and a
        hand-written loop may too.
        """
        applies = self.scales_gradients and is_adaptive_optimizer(optimizer)
        if applies and not self._optimizer_warned:
            warnings.warn(
                f"{self.name} works by multiplying gradients, but {type(optimizer).__name__} divides each "
                "update by a running RMS of the gradients, which cancels most of a slowly varying factor "
                "(see benchmarks/adam_modulation.py). Use SGD, the optimizer of the method's reference "
                "runs, to get the method's effect.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._optimizer_warned = True
        return applies

    # ------------------------------------------------------------------ schedule and state
    def set_epoch(self, epoch: int) -> None:
        """Tell the balancer which epoch (0-based) is starting."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch expects an epoch number >= 0, found {epoch!r}.")
        self.epoch = int(epoch)
        self._epoch_set = True

    def prepare_epoch(self, data: EpochData) -> None:
        """Epoch-level preparation, after :meth:`set_epoch`; calls :meth:`on_epoch_start` while active.

        Harmless for balancers that need no epoch data (nothing happens).
        """
        if not isinstance(data, EpochData):
            raise TypeError(f"prepare_epoch expects an equimodal EpochData, found {type(data).__name__}.")
        req = self.requirements
        if req.set_epoch and not self._epoch_set:
            raise DriverError(f"{self.name}: call balancer.set_epoch(epoch) before prepare_epoch(...).")
        if req.heldout_fraction and data.heldout is None:
            raise ValueError(
                f"{self.name} needs held-out data carved from the training split (never val/test): pass "
                f"EpochData(heldout=...), e.g. a stratified {req.heldout_fraction:.0%} of train that the model "
                "does not train on (the reference trainer carves it from `requirements.heldout_fraction`)."
            )
        self._prepared_epoch = self.epoch
        if self.active and req.epoch_data:
            self.on_epoch_start(data)

    @property
    def active(self) -> bool:
        """Whether the method acts in the current epoch (``start_epoch <= epoch <= end_epoch``)."""
        return self.epoch >= self.start_epoch and (self.end_epoch is None or self.epoch <= self.end_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (epoch, steps, random generator); subclasses extend the dict returned here."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "num_steps": self.num_steps,
            "epoch_set": self._epoch_set,
            "prepared_epoch": self._prepared_epoch,
        }
        gen_state = self._gen.get_state() if self._gen is not None else self._pending_gen_state
        if gen_state is not None:
            state["generator"] = gen_state.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the generator continues where it stopped)."""
        self.epoch = int(state["epoch"])
        self.num_steps = int(state.get("num_steps", 0))
        self._epoch_set = bool(state.get("epoch_set", True))
        self._prepared_epoch = state.get("prepared_epoch")
        self._gen, self._pending_gen_state = None, state.get("generator")

    def generator(self, device: torch.device) -> torch.Generator:
        """The balancer's random generator on ``device``, seeded with ``seed`` identically on every rank.

        Created lazily (on the gradients' device) and restored from a loaded state; a state saved on
        another device type cannot be restored there, so the generator is then reseeded (with a warning).
        """
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = make_generator(self.seed, device)
            if self._pending_gen_state is not None:
                try:
                    self._gen.set_state(self._pending_gen_state)
                except (RuntimeError, TypeError, ValueError):
                    log.warning(
                        "%s: saved generator state does not fit device %s; reseeding.", self.name, device
                    )
                    self._gen.manual_seed(self.seed + self.num_steps)
                self._pending_gen_state = None
        return self._gen

    def stats(self) -> dict[str, float]:
        """Per-step observability figures of the last step (e.g. ``k/audio``), for logging."""
        return dict(self._stats)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters the balancer owns (e.g. MLA's shared head); add them to the optimizer."""
        return iter(())

    # ------------------------------------------------------------------ evaluation
    def predict(self, out: MultimodalOutput) -> Tensor:
        """Logits used for evaluation: :meth:`fused_prediction` while active, else the fused logits."""
        return self.fused_prediction(out) if self.active else out.logits

    def predict_unimodal(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's evaluation logits: :meth:`unimodal_prediction` while active, else the model's."""
        return self.unimodal_prediction(out) if self.active else out.unimodal_logits

    # ------------------------------------------------------------------ hooks a method overrides
    def observe(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> None:
        """Record this micro-batch's statistics for :meth:`adjust_gradients` (called while active)."""

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The training objective of one micro-batch while active; CE on the fused logits by default.

        The base class adds the auxiliary-head term (:meth:`auxiliary_loss`) to what this returns.
        """
        return F.cross_entropy(out.logits, target)

    def adjust_gradients(self) -> None:
        """Edit the accumulated ``.grad`` in place once per optimizer step (called while active)."""

    def on_epoch_start(self, data: EpochData) -> None:
        """Epoch-level work over ``data`` (called while active); overriding it requires epoch data."""

    def own_step(
        self, batch: Batch, target: Tensor, optimizer: torch.optim.Optimizer, micro_batches: int
    ) -> Tensor:
        """A whole optimisation step of the method's own (called while active); overriding it means the
        balancer must be driven by :meth:`train_step`."""
        raise NotImplementedError  # pragma: no cover - only reached through an override

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """Evaluation logits while active (default: the fused logits)."""
        return out.logits

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Per-modality evaluation logits while active (default: the model's unimodal logits)."""
        return out.unimodal_logits

    # ------------------------------------------------------------------ helpers for subclasses
    def auxiliary_loss(self, out: MultimodalOutput, target: Tensor) -> Tensor:
        """CE of auxiliary unimodal heads that see detached features (0 for splittable fusions).

        Fusions that cannot be split (FiLM, gated, attention) carry per-modality heads on
        *detached* features, so this term trains those heads only and never moves the encoders
        or the fusion; it keeps their unimodal logits meaningful for balancers to read. The base
        class adds it to every loss; a method overrides it only when its objective trains a head itself.
        """
        if not getattr(self.model, "auxiliary_heads", False):
            return out.logits.new_zeros(())
        return sum(F.cross_entropy(out.unimodal_logits[m], target) for m in self.modalities)

    def encoder_params(self, modality: str) -> list[nn.Parameter]:
        """Trainable parameters of one modality's encoder."""
        return [p for p in self.model.encoders[modality].parameters() if p.requires_grad]

    @staticmethod
    def grads_finite(params: Iterable[nn.Parameter]) -> bool:
        """True when every existing gradient is finite (an AMP overflow step is not)."""
        norms = [p.grad.detach().abs().amax() for p in params if p.grad is not None and p.grad.numel()]
        if not norms:
            return True
        return math.isfinite(float(torch.stack(norms).amax()))


def split_batch(batch: Batch, target: Tensor, chunks: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Split a batch (every tensor entry with the labels' length) into ``chunks`` micro-batches."""
    n = target.shape[0]
    if chunks > n:
        raise ValueError(f"Cannot split a batch of {n} samples into {chunks} micro-batches.")
    bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = {k: v[lo:hi] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v for k, v in batch.items()}
        out.append((part, target[lo:hi]))
    return out


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the existing gradients of ``params`` over DDP ranks in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
