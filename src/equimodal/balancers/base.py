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
``start_epoch(e, data)``   :meth:`on_epoch_start`          epoch-level work over train / held-out data
``train_step(b, y, opt)``  :meth:`own_step`                a whole optimisation step of its own
``predict(out)``           :meth:`fused_prediction`        evaluation logits (default: fused logits)
``predict_unimodal(out)``  :meth:`unimodal_prediction`     per-modality evaluation logits
=========================  ==============================  =============================================

What a driver must do is derived from what a balancer overrides (as Lightning checks overridden hooks)
and exposed in one place, :attr:`Balancer.requirements`. Every public call checks it and raises
:class:`DriverError` at the first wrong call, naming the call that is needed, so no driver (a user's
loop, the reference trainer, Lightning) can silently run a different method than the one named:

- a balancer that overrides :meth:`own_step` must be driven by :meth:`train_step`;
- one that overrides :meth:`on_epoch_start` needs its epoch data at every epoch start,
  ``start_epoch(epoch, EpochData(...))`` (with ``EpochData.heldout`` when ``heldout_fraction > 0``);
- one with a bounded epoch window, epoch data, or its own :meth:`set_epoch` needs :meth:`start_epoch`
  (which calls :meth:`set_epoch`, then :meth:`prepare_epoch` where needed: the one epoch start of every
  driver);
- one with ``needs_batch = True`` needs ``loss(..., batch=inputs)``.

What every method would otherwise have to remember is declared, not written (as torchmetrics' metrics
declare ``add_state``; :mod:`~equimodal.balancers.state`): :meth:`Balancer.add_stat` declares a statistic
that :meth:`observe` adds to per micro-batch, which the base class keeps on the gradients' device,
all-reduces once per optimizer step (one flat collective per reduce op) and resets;
:meth:`Balancer.add_state` declares persistent state, which ``state_dict``/``load_state_dict`` save and
restore and which a non-finite step (an AMP overflow) leaves as it was, on the device. Figures for logging
are recorded as device tensors (:meth:`Balancer.record`) and read on the host only when a driver asks
(:meth:`Balancer.stats`), so a step that logs nothing reads nothing on the host;
:func:`equimodal.testing.check_host_reads` counts it.
"""

from __future__ import annotations

import logging
import re
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import Reduce, all_reduce_grads, make_generator
from ..types import MultimodalOutput, check_output, modality_names
from .epoch_data import EpochData
from .options import checked_option
from .plan import INDEX_KEY, PLAN_WEIGHT_KEY, EpochPlan, PlanSource, planned_loader
from .state import Declared
from .step_check import StepCheck

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
        epoch_plan: the balancer plans each epoch's training data (:mod:`~equimodal.balancers.plan`): train
            on ``balancer.planned_loader(dataset, ...)`` and pass ``EpochData(indexed=..., size=...)``.
    """

    own_step: bool = False
    epoch_data: bool = False
    set_epoch: bool = False
    batch: bool = False
    heldout_fraction: float = 0.0
    parameters: bool = False
    unused_parameters: bool = False
    epoch_plan: bool = False

    def describe(self) -> list[str]:
        """One line per call a hand-written loop must make besides the two calls."""
        lines = []
        if self.own_step:
            lines.append("train_step(batch, labels, optimizer) instead of loss()/before_step()")
        if self.epoch_data:
            held = f" with heldout= {self.heldout_fraction:.0%} of train" if self.heldout_fraction else ""
            lines.append(f"start_epoch(epoch, EpochData(...){held}) at the start of each epoch")
        elif self.set_epoch:
            lines.append("start_epoch(epoch) at the start of each epoch")
        if self.epoch_plan:
            lines.append(
                "train on balancer.planned_loader(train_dataset, batch_size=...) (built once), and pass "
                "EpochData(indexed=<train in a fixed order with indices>, size=len(train_dataset))"
            )
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
        start_epoch: first epoch (inclusive) in which the method acts (kept as ``first_epoch``).
        end_epoch: last epoch (inclusive) in which it acts; ``None`` means no end (kept as ``last_epoch``).
        seed: seed of the balancer's random generator (identical on all DDP ranks).

    Class attributes a method may set (read only by :attr:`requirements`): ``needs_batch`` (its hooks
    read the model inputs), ``heldout_fraction`` (its epoch data needs a held-out part of train; may be
    set per instance), ``unused_parameters`` (some parameters get no gradient). One more is a
    documented property, not a requirement: ``micro_batch_statistics`` (its loss depends on statistics
    of each micro-batch, so with gradient accumulation each micro-batch decides for itself, as in PMR).
    ``name`` is set by :func:`~equimodal.register_balancer`. ``scales_gradients`` (the method acts by
    multiplying gradients, as OGM, AGM and MSLR do) makes :meth:`check_optimizer` warn under adaptive
    optimizers, which cancel most of such a factor. ``step_host_reads`` is the number of host reads a step
    that logs nothing needs by the method's nature (a host decision; 0 for every built-in method), which
    the contract suite holds it to (:func:`~equimodal.testing.check_host_reads`); say why where you set it.
    ``unimodal_runs_option`` names an option that takes ``{modality: folder of a finished unimodal run of
    the same data, model and seed}`` (UMT's teachers): ``equimodal compare`` fills it with its own
    reference runs and trains those first. ``model_fusion`` names the ``model.fusion`` the method needs
    (``"mmtm"``: mid fusion, for greedy; ``None``: any model), which the toy models of
    :mod:`equimodal.testing` and the reference runs of the test suite follow; the method itself refuses
    another model.
    """

    name: ClassVar[str] = "base"
    needs_batch: ClassVar[bool] = False
    micro_batch_statistics: ClassVar[bool] = False
    scales_gradients: ClassVar[bool] = False
    step_host_reads: ClassVar[int] = 0
    unimodal_runs_option: ClassVar[str | None] = None
    plans_data: ClassVar[bool] = False
    model_fusion: ClassVar[str | None] = None
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
        self.first_epoch = int(start_epoch)
        self.last_epoch = None if end_epoch is None else int(end_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.num_steps = 0
        self._declared = Declared()
        self._records: dict[str, tuple[list[str], Tensor]] = {}
        self._finite: Tensor | None = None
        self._step_open = False
        self._labels_checked = False
        self._step_check: StepCheck | None = None
        self._gen: torch.Generator | None = None
        self._pending_gen_state: Tensor | None = None
        self._epoch_set = False
        self._prepared_epoch: int | None = None
        self._optimizer_warned = False
        self._optimizer_ref: weakref.ReferenceType[torch.optim.Optimizer] | None = None
        self._plan_source = PlanSource()
        self._plan_figures: dict[str, Tensor] = {}
        self._epoch_size: int | None = None

    def check_option(self, key: str, value: Any, **rules: Any) -> Any:
        """``value`` of option ``key`` if it follows ``rules``, else a ValueError in the one format,
        ``Balancer 'NAME' option 'KEY' must be EXPECTED, found VALUE.`` The rules
        (:func:`~equimodal.balancers.options.checked_option`): ``choices``, or a finite number with
        ``low`` / ``high`` (``open_low`` / ``open_high`` to exclude them) and ``integer``; ``allow_none``;
        ``hint``, said after the value. A number comes back as ``float`` (``int`` with ``integer``)."""
        return checked_option(self.name, key, value, **rules)

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
        return Requirements(
            own_step=self.overrides("own_step"),
            epoch_data=epoch_data,
            set_epoch=self.bounded or epoch_data or self.overrides("set_epoch"),
            batch=bool(self.needs_batch or self.plans_data),
            heldout_fraction=float(self.heldout_fraction) if epoch_data else 0.0,
            parameters=any(True for _ in self.parameters()),
            unused_parameters=bool(self.unused_parameters),
            epoch_plan=bool(self.plans_data),
        )

    @property
    def bounded(self) -> bool:
        """Whether the epoch window starts after epoch 0 or ends."""
        return self.first_epoch > 0 or self.last_epoch is not None

    def _check_driver(self, call: str, *, batch: object = True) -> None:
        """Raise :class:`DriverError` when ``call`` is made without what the balancer needs."""
        req = self.requirements
        if req.own_step and call != "train_step()":
            raise DriverError(
                f"{self.name} runs its own step: call balancer.train_step(batch, labels, optimizer) instead "
                f"of loss()/before_step() (found a call to {call})."
            )
        if req.set_epoch and not self._epoch_set:
            end = "end" if self.last_epoch is None else self.last_epoch
            why = f"acts in epochs {self.first_epoch}-{end} only" if self.bounded else "works per epoch"
            raise DriverError(
                f"{self.name} {why}: call balancer.start_epoch(epoch) (or set_epoch(epoch)) at the start of "
                f"every epoch, before the first {call}."
            )
        if req.epoch_data and self._prepared_epoch != self.epoch:
            held = " and heldout= a part of train (never val/test)" if req.heldout_fraction else ""
            raise DriverError(
                f"{self.name} needs its epoch data at each epoch start: call balancer.start_epoch(epoch, "
                f"EpochData(train=...{held}, device=...)), or set_epoch(epoch) then "
                f"prepare_epoch(EpochData(...)); found {call} in epoch {self.epoch} without it."
            )
        if req.batch and batch is None:
            raise DriverError(
                f"{self.name} needs the model inputs: call balancer.loss(out, labels, batch=batch) (found "
                "batch=None)."
            )
        planned = not isinstance(batch, Mapping) or (PLAN_WEIGHT_KEY in batch and INDEX_KEY in batch)
        if req.epoch_plan and self.epoch_plan is not None and not planned:
            raise DriverError(
                f"{self.name} planned epoch {self.epoch}'s training data, but {call} got a batch without the "
                f"plan's keys ({INDEX_KEY!r}, {PLAN_WEIGHT_KEY!r}): train on "
                "balancer.planned_loader(train_dataset, batch_size=...), which follows the plan."
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
        self.validate_output(out, target)
        if not self._step_open:  # the first micro-batch of an optimizer step
            self._records.clear()
            self._declared.to(self, self.device)
            self._step_open = True
        if not self.active:
            return F.cross_entropy(out.logits, target) + Balancer.auxiliary_loss(self, out, target)
        self.observe(out, target, batch)
        return self.objective(out, target, batch) + self.auxiliary_loss(out, target)

    def validate_output(self, out: MultimodalOutput, target: Tensor) -> None:
        """Check a model output and its labels against the contract (raises naming what is wrong).

        The labels' range needs a host read, so it is checked at the first call only (until one passes);
        later calls check the output's shapes, which costs none (an out-of-range label then fails in the
        cross-entropy itself).
        """
        check_output(out, self.modalities, None if self._labels_checked else target)
        self._labels_checked = True

    def before_step(self) -> None:
        """Edit ``.grad`` in place once per optimizer step (after backward/unscale, before step)."""
        self._check_driver("before_step()")
        self._step_gradients()

    def _step_gradients(self) -> None:
        self.num_steps += 1
        if not self._step_open:  # a step without a loss() call
            self._records.clear()
        if self.active:
            self._declared.to(self, self.device)
            self._declared.all_reduce(self)
            self._own_parameters_step()
            saved = self._declared.snapshot(self)
            finite = self.step_finite if saved else None  # taken before the gradients are edited
            self.adjust_gradients()
            self._record_plan()
            if finite is not None:
                self._declared.restore(self, saved, finite)
        self._declared.reset_stats(self, self.device)
        self._finite, self._step_open = None, False

    def _own_parameters_step(self) -> None:
        """Average the gradients of the balancer's own parameters over ranks (they are outside the user's
        DDP wrapper) and check that the optimizer steps them (:mod:`~equimodal.balancers.step_check`)."""
        own = list(self.parameters())
        if not own:
            return
        all_reduce_grads(own)
        if self._step_check is None:
            self._step_check = StepCheck(self.name)
        problem = self._step_check(own, self.model)
        if problem is not None:
            raise DriverError(problem)

    def train_step(
        self, batch: Batch, target: Tensor, optimizer: torch.optim.Optimizer, *, micro_batches: int = 1
    ) -> Tensor:
        """Run one whole optimisation step on ``batch``; works for every balancer.

        Balancers that own their step run :meth:`own_step`; the others run the two calls (forward,
        :meth:`loss`, backward, :meth:`before_step`, ``optimizer.step()``). ``micro_batches`` splits the
        batch into that many chunks whose gradients are accumulated, each weighted by its share of the
        samples, before the step (the update of the whole batch, but for batch-norm statistics). Gradients
        are zeroed before and after. Under DDP (the model here is not wrapped) gradients are averaged over
        ranks before they are adjusted. Returns the mean loss.
        """
        self._check_driver("train_step()", batch=batch)
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
            self._records.clear()
            loss = self.own_step(batch, target, optimizer, micro_batches)
            self._record_plan()
            self.num_steps += 1
            return loss
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for chunk, y in split_batch(batch, target, micro_batches):
            loss = self._loss(self.model(chunk), y, chunk) * (y.shape[0] / target.shape[0])
            loss.backward()
            losses.append(loss.detach())
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
        hand-written loop may too. The balancer remembers the optimizer (weakly): a method that resets the
        optimizer state of parameters it re-initialises (:attr:`optimizer`) needs this call.
        """
        self._optimizer_ref = weakref.ref(optimizer)
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

    # ------------------------------------------------------------------ schedule
    def start_epoch(self, epoch: int, data: EpochData | None = None) -> None:
        """Start epoch ``epoch`` (0-based): :meth:`set_epoch`, then :meth:`prepare_epoch` with ``data`` when
        ``requirements.epoch_data`` says so. Every driver calls this at each epoch start.

        An epoch is prepared once: when it already was (a run resumed mid-epoch restores that with
        :meth:`load_state_dict`), ``data`` is not read again. ``data`` may be ``None`` for balancers that
        need no epoch data.

        Raises:
            DriverError: the balancer needs epoch data and ``data`` is ``None``.
        """
        self.set_epoch(epoch)
        if not self.requirements.epoch_data or self._prepared_epoch == self.epoch:
            return
        if data is None:
            held = ", heldout=<a part of train>" if self.requirements.heldout_fraction else ""
            raise DriverError(
                f"{self.name} works on its epoch data at each epoch start: call balancer.start_epoch(epoch, "
                f"EpochData(train=...{held}, device=...)) (found data=None)."
            )
        self.prepare_epoch(data)

    def set_epoch(self, epoch: int) -> None:
        """Tell the balancer which epoch (0-based) is starting (:meth:`start_epoch` calls it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch expects an epoch number >= 0, found {epoch!r}.")
        self.epoch = int(epoch)
        self._epoch_set = True

    def prepare_epoch(self, data: EpochData) -> None:
        """Epoch-level preparation, after :meth:`set_epoch`; calls :meth:`on_epoch_start` while active.

        Harmless for balancers that need no epoch data (nothing happens). :meth:`start_epoch` calls it.
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
        if req.epoch_plan and (data.indexed is None or data.size is None):
            raise ValueError(
                f"{self.name} plans each epoch's training data from per-sample passes: pass EpochData(indexed=<the "
                "training split in a fixed order, batches carrying 'index'>, size=<its length>), e.g. "
                "indexed=equimodal.balancers.plan.indexed_loader(train_dataset, batch_size=...)."
            )
        self._prepared_epoch = self.epoch
        self._epoch_size = data.size
        self.set_plan(None)  # a plan holds for the epoch it was made in
        if self.active and req.epoch_data:
            self.on_epoch_start(data)

    @property
    def active(self) -> bool:
        """Whether the method acts in the current epoch (``first_epoch <= epoch <= last_epoch``)."""
        return self.epoch >= self.first_epoch and (self.last_epoch is None or self.epoch <= self.last_epoch)

    # ------------------------------------------------------------------ epoch data plans
    @property
    def epoch_plan(self) -> EpochPlan | None:
        """This epoch's data plan (:meth:`set_plan`), or ``None``: the training data as it is."""
        return self._plan_source.plan

    def set_plan(self, plan: EpochPlan | None) -> None:
        """Set this epoch's data plan (call it from :meth:`on_epoch_start`; only ``plans_data`` balancers may).

        Every step of the epoch records the plan's figures (``plan/entries``, ``plan/extra_copies``,
        ``plan/left_out``, ``plan/zeroed/<m>``, ``plan/weight_mean``, ``plan/train_size``), so a run's
        ``metrics.csv`` shows how much the plan changed the data.

        Raises:
            TypeError: the balancer does not declare ``plans_data = True``.
            ValueError: the plan's modalities are not the model's, or it indexes outside the training split.
        """
        if plan is not None:
            if not self.plans_data:
                raise TypeError(f"{self.name} sets a data plan but does not declare plans_data = True.")
            if list(plan.modalities) != self.modalities:
                raise ValueError(
                    f"The epoch plan's modalities {list(plan.modalities)} are not the model's {self.modalities}."
                )
            if self._epoch_size is not None:
                plan.check_size(self._epoch_size)
        self._plan_source.plan, self._plan_source.epoch = plan, self.epoch
        self._plan_figures = self._figures_of(plan)

    def _figures_of(self, plan: EpochPlan | None) -> dict[str, Tensor]:
        """The plan's mechanism figures (:meth:`EpochPlan.summary`), recorded at every step of its epoch."""
        if plan is None:
            return {}
        figures = plan.summary(self._epoch_size)
        if self._epoch_size is not None:
            figures["train_size"] = float(self._epoch_size)
        return {f"plan/{k}": torch.tensor(v, device=self.device) for k, v in figures.items()}

    def _record_plan(self) -> None:
        for name, value in self._plan_figures.items():
            self.record(name, value)

    def planned_loader(self, dataset: Any, *, batch_size: int, shuffle: bool = True, **kwargs: Any) -> Any:
        """A ``DataLoader`` over ``dataset`` (the training split) that follows this balancer's data plan.

        Build it once: every pass (epoch) reads the current plan, shuffles with a generator seeded by the
        balancer's ``seed`` and epoch, and shards the entries over ranks when ``torch.distributed`` is
        initialised. Items are ``(inputs, label)`` pairs or mappings holding the label; each gains the
        sample's index and its plan weight (:class:`~equimodal.balancers.plan.PlannedDataset`). Other keyword
        arguments go to the ``DataLoader`` (``num_workers``, ``collate_fn``, ...; not ``persistent_workers``).
        """
        return planned_loader(
            dataset, self._plan_source, batch_size=batch_size, seed=self.seed, shuffle=shuffle, **kwargs
        )

    def plan_weights(self, batch: Batch | None) -> Tensor | None:
        """The plan weight of every sample of a planned batch (``None`` without a plan or without weights)."""
        plan = self.epoch_plan
        if plan is None or plan.weights is None or batch is None or PLAN_WEIGHT_KEY not in batch:
            return None
        return batch[PLAN_WEIGHT_KEY].float()

    def weighted_cross_entropy(self, logits: Tensor, target: Tensor, batch: Batch | None) -> Tensor:
        """Cross-entropy with each sample weighted by its plan weight (``sum w_i CE_i / B``; the plain mean
        when the plan has no weights)."""
        weights = self.plan_weights(batch)
        if weights is None:
            return F.cross_entropy(logits, target)
        return (
            F.cross_entropy(logits, target, reduction="none") * weights.to(logits.device)
        ).sum() / target.shape[0]

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer last passed to :meth:`check_optimizer` (or :meth:`train_step`), if still alive."""
        return None if self._optimizer_ref is None else self._optimizer_ref()

    # ------------------------------------------------------------------ declared statistics and state
    def add_stat(self, name: str, default: Tensor | None = None, *, reduce: Reduce = "sum") -> None:
        """Declare a statistic of one optimizer step, kept as ``self.<name>`` (call it in ``__init__``).

        :meth:`observe` (or :meth:`objective`) adds to it per micro-batch, ``self.<name> += value`` or
        :meth:`accumulate`; :meth:`adjust_gradients` reads it. The base class keeps it on the gradients'
        device, reduces it over DDP ranks once per optimizer step, before :meth:`adjust_gradients` (one flat
        collective per reduce op), and resets it to ``default`` after the step.

        Args:
            name: the attribute name.
            default: its value at the start of every step; ``None`` (nothing seen yet) for a statistic
                sized by the first value :meth:`accumulate` adds.
            reduce: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"`` over ranks.
        """
        self._declared.add_stat(self, name, default, reduce)

    def add_state(self, name: str, default: Any, *, rollback: bool = True, missing: str = "") -> None:
        """Declare persistent state, kept as ``self.<name>``, saved and restored by :meth:`state_dict`
        (call it in ``__init__``).

        ``default`` is a tensor (kept on the gradients' device, saved on the CPU), plain data (numbers,
        strings, lists, dicts, ``None``; copied), or an object with ``state_dict``/``load_state_dict`` such as
        an ``nn.Module`` (saved by its ``state_dict``, loaded in place so an optimizer keeps its parameters).

        Args:
            name: the attribute name (also its key in :meth:`state_dict`).
            default: the initial value.
            rollback: a tensor state that :meth:`adjust_gradients` changes in a non-finite step (an AMP
                overflow) is restored to its value before the step, on the device; ``False`` for a state
                that must see such steps (e.g. a counter of them).
            missing: what to do when a loaded state lacks this entry, appended to the error.
        """
        self._declared.add_state(self, name, default, rollback, missing)

    def accumulate(self, name: str, value: Tensor) -> None:
        """Add ``value`` to statistic ``name`` (a copy of ``value`` when the statistic holds ``None``)."""
        self._declared.accumulate(self, name, value)

    def record(self, name: str, value: Tensor, keys: Sequence[str] | None = None) -> None:
        """Record a figure of this step for logging, as a device tensor (read only by :meth:`stats`).

        A 0-d ``value`` is logged as ``name``; a vector as ``name/<key>`` for each of ``keys`` (default:
        the modalities). A second record of ``name`` in the same step replaces the first.
        """
        value = value.detach()
        if value.dim() == 0:
            names = [name]
        else:
            keys = self.modalities if keys is None else list(keys)
            if value.dim() != 1 or value.numel() != len(keys):
                raise ValueError(
                    f"record({name!r}, ...) expects a 0-d tensor or one value per key ({len(keys)}), found "
                    f"shape {tuple(value.shape)}."
                )
            names = [f"{name}/{k}" for k in keys]
        self._records[name] = (names, value)

    @property
    def step_finite(self) -> Tensor:
        """A 0-d bool device tensor: whether this step's gradients and statistics are all finite.

        Computed, without a host read, at its first use in a step (the base class uses it before
        :meth:`adjust_gradients` when the balancer declared state to protect): read it before editing
        gradients. A method keeps a non-finite step's gradients unchanged with ``torch.where(finite, ...)``.
        """
        if self._finite is None:
            params = [*self.model.parameters(), *self.parameters()]
            grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
            tensors = grads + self._declared.stat_tensors(self)
            if not tensors:
                self._finite = torch.ones((), dtype=torch.bool, device=self.device)
            else:
                peaks = torch.stack(torch._foreach_norm(tensors, ord=float("inf")))
                self._finite = torch.isfinite(peaks).all()
        return self._finite

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter, where the declared tensors are kept."""
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Serializable state: epoch, steps, random generator and every state :meth:`add_state` declared."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "num_steps": self.num_steps,
            "epoch_set": self._epoch_set,
            "prepared_epoch": self._prepared_epoch,
        }
        if self.epoch_plan is not None:
            state["plan"] = self.epoch_plan.state()
            state["epoch_size"] = self._epoch_size
        gen_state = self._gen.get_state() if self._gen is not None else self._pending_gen_state
        if gen_state is not None:
            state["generator"] = gen_state.clone()
        state.update(self._declared.save(self))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the generator continues where it stopped)."""
        self.epoch = int(state["epoch"])
        self.num_steps = int(state.get("num_steps", 0))
        self._epoch_set = bool(state.get("epoch_set", True))
        self._prepared_epoch = state.get("prepared_epoch")
        plan = state.get("plan")
        self._plan_source.plan = None if plan is None else EpochPlan.from_state(plan)
        self._plan_source.epoch = self.epoch
        self._epoch_size = state.get("epoch_size")
        self._plan_figures = self._figures_of(self._plan_source.plan)
        self._gen, self._pending_gen_state = None, state.get("generator")
        self._declared.load(self, state, self.name)

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

    def stat_values(self) -> tuple[list[str], Tensor | None]:
        """The names and values (one float64 device vector) of this step's :meth:`record` ed figures.

        No host read: a driver accumulates them on the device (the reference trainer's epoch means).
        ``(names, None)`` with no names when nothing was recorded.
        """
        if not self._records:
            return [], None
        parts = list(self._records.values())
        device = parts[0][1].device
        names = [n for ns, _ in parts for n in ns]
        return names, torch.cat([v.reshape(-1).to(device, torch.float64) for _, v in parts])

    def stats(self) -> dict[str, float]:
        """This step's recorded figures (e.g. ``k/audio``) as floats, for logging: one host read."""
        names, values = self.stat_values()
        return {} if values is None else dict(zip(names, values.tolist(), strict=True))

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
        """Add this micro-batch's statistics (declared by :meth:`add_stat`) (called while active)."""

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The training objective of one micro-batch while active; CE on the fused logits by default, each
        sample weighted by its plan weight when an epoch plan with weights is set
        (:meth:`weighted_cross_entropy`; the plain mean otherwise).

        The base class adds the auxiliary-head term (:meth:`auxiliary_loss`) to what this returns.
        """
        return self.weighted_cross_entropy(out.logits, target, batch)

    def adjust_gradients(self) -> None:
        """Edit the accumulated ``.grad`` in place once per optimizer step (called while active), with the
        statistics already reduced over ranks."""

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
