"""The ``Balancer`` base class: an optimizer-shaped object with a two-call hook.

A balancer is built from the model (like an optimizer), called once per micro-batch through
:meth:`Balancer.loss` (which replaces ``F.cross_entropy``) and once per optimizer step through
:meth:`Balancer.before_step` (the point where ``clip_grad_norm_`` would go: gradients accumulated,
unscaled, not yet clipped). It is not an ``nn.Module``; its state round-trips through
``state_dict``/``load_state_dict``.

Extension hooks, used only by methods that need more than the two calls (plain loops can ignore
them; the reference trainer calls them when the capability flags say so):

- ``needs_epoch_data`` / :meth:`prepare_epoch`: called at the start of each epoch with an
  :class:`EpochData` (train and held-out iterables) for methods that compute epoch-level
  statistics (PMR prototypes) or fit weights on held-out data (G-Blending).
- ``owns_step`` / :meth:`train_step`: the balancer runs the whole optimisation of one batch itself
  (several backward passes or alternating unimodal passes, e.g. MLA).
- ``needs_batch``: :meth:`loss` must be called with ``batch=`` (the model inputs).
- ``unused_parameters``: some model parameters get no gradient (wrap with DDP's
  ``find_unused_parameters=True``).
- :meth:`parameters`: parameters the balancer owns; the optimizer must include them.
- ``heldout_fraction`` (may be set per instance): when > 0 the trainer carves that (stratified) fraction out of the training
  split and passes it as ``EpochData.heldout`` (G-Blending); it is never taken from val or test.
- :meth:`predict` / :meth:`predict_unimodal`: how fused and per-modality logits are formed at
  evaluation (default: the model's fused and unimodal logits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import make_generator
from ..types import MultimodalOutput, check_output, modality_names

Batch = Mapping[str, Tensor]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochData:
    """What the trainer hands to :meth:`Balancer.prepare_epoch`.

    Attributes:
        train: a callable returning a fresh iterable of ``(batch, labels)`` over the training split.
        heldout: the same over a held-out split carved from train (never the test set), or ``None``.
        device: the device the model lives on.
    """

    train: Callable[[], Iterable[tuple[Batch, Tensor]]]
    heldout: Callable[[], Iterable[tuple[Batch, Tensor]]] | None
    device: torch.device


class Balancer:
    """Base class of every balancer; on its own it is plain joint training (CE on fused logits).

    Args:
        model: a model satisfying the contract (``model.encoders`` ModuleDict; forward returns
            ``MultimodalOutput``).
        start_epoch: first epoch (inclusive) in which the method acts.
        end_epoch: last epoch (inclusive) in which it acts; ``None`` means no end.
        seed: seed of the balancer's random generator (identical on all DDP ranks).
    """

    name: ClassVar[str] = "base"
    needs_epoch_data: ClassVar[bool] = False
    owns_step: ClassVar[bool] = False
    heldout_fraction: float = 0.0
    needs_batch: ClassVar[bool] = False
    unused_parameters: ClassVar[bool] = False

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

    # ------------------------------------------------------------------ the two calls
    def loss(self, out: MultimodalOutput, target: Tensor, *, batch: Batch | None = None) -> Tensor:
        """Return the training loss for one micro-batch (replaces ``F.cross_entropy``).

        ``batch`` (the model's inputs) is needed only by balancers with ``needs_batch = True``
        (e.g. AGM, which runs extra forward passes with modalities zeroed); others ignore it.
        """
        check_output(out, self.modalities, target)
        return F.cross_entropy(out.logits, target) + self.auxiliary_loss(out, target)

    def before_step(self) -> None:
        """Edit ``.grad`` in place once per optimizer step (after backward/unscale, before step)."""
        self.num_steps += 1

    # ------------------------------------------------------------------ schedule and state
    def set_epoch(self, epoch: int) -> None:
        """Tell the balancer which epoch (0-based) is starting."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        """Whether the method acts in the current epoch (``start_epoch <= epoch <= end_epoch``)."""
        return self.epoch >= self.start_epoch and (self.end_epoch is None or self.epoch <= self.end_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (epoch, steps, random generator); subclasses extend the dict returned here."""
        state: dict[str, Any] = {"epoch": self.epoch, "num_steps": self.num_steps}
        gen_state = self._gen.get_state() if self._gen is not None else self._pending_gen_state
        if gen_state is not None:
            state["generator"] = gen_state.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the generator continues where it stopped)."""
        self.epoch = int(state["epoch"])
        self.num_steps = int(state.get("num_steps", 0))
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

    # ------------------------------------------------------------------ optional hooks
    def prepare_epoch(self, data: EpochData) -> None:
        """Epoch-level preparation (only called when ``needs_epoch_data`` is True)."""

    def train_step(self, batch: Batch, target: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        """Run one full optimisation step for a batch (only for ``owns_step`` balancers)."""
        raise NotImplementedError(f"{type(self).__name__} does not own the training step.")

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the balancer owns (e.g. MLA's shared head); add them to the optimizer."""
        return []

    def predict_unimodal(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's own logits at evaluation; ``out.unimodal_logits`` unless the method says otherwise."""
        return out.unimodal_logits

    def predict(self, out: MultimodalOutput) -> Tensor:
        """Logits used for evaluation; the fused logits unless the method says otherwise."""
        return out.logits

    # ------------------------------------------------------------------ helpers for subclasses
    def auxiliary_loss(self, out: MultimodalOutput, target: Tensor) -> Tensor:
        """CE of auxiliary unimodal heads that see detached features (0 for splittable fusions).

        Fusions that cannot be split (FiLM, gated, attention) carry per-modality heads on
        *detached* features, so this term trains those heads only and never moves the encoders
        or the fusion; it keeps their unimodal logits meaningful for balancers to read.
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
