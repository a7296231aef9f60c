"""ReconBoost (Hua et al., ICML 2024): modalities take turns as boosting learners, then a global rectification.

Paper: C. Hua, Q. Xu, S. Bao, Z. Yang, Q. Huang, "ReconBoost: Boosting Can Achieve Modality
Reconcilement", ICML 2024. Official code: ``train.py`` (``main``: the ``while check_status(stage)`` loop,
its phase 1 "boosting" and phase 2 "correct" loops), ``train_MSA.py`` (the three-modality loop),
``models/dynamic_net.py`` (``DynamicNet.forward`` / ``forward_grad`` / ``parameters``; ``Head``, ``MHead``)
and ``schedule.py`` (``schedule_model``, ``fixed_mode``).

Learner m is modality m's encoder followed by one head shared by every learner (the authors'
``common_space``: ``model.fc = net_ensemble.head``, ``Head`` = Linear(d, 256), ReLU, Linear(256, K)), owned
by this balancer; ``head="model"`` takes the model's own unimodal logits instead. The ensemble is
``F = beta * sum_j h_j`` with a learnable ``boost_rate`` beta. Training runs in stages, one modality per
stage in the model's order (``schedule_model``'s fixed mode), each stage being

1. ``epochs_per_stage`` epochs on learner m alone (the others' logits and beta detached)::

       L_m = mean_b [ -(w1 - w2 * softmax(F_{-m})_y) * log softmax(h_m)_y ] / K  +  alpha * L_GA
       F_{-m} = beta * sum_{j != m} h_j,   L_GA = mean_{b,k} (softmax(h_m) - sg[softmax(h_prev)])^2

   ``(w1 - w2 p_F(y))`` is the reconcilement weight: samples the other learners already get right weigh
   less. ``prev`` is the previous stage's learner (``pre_model``); L_GA is left out in stage 0. The ``/K``
   is the released ``.mean(-1)`` over the one-hot's classes (``class_mean``).
2. ``correct_epoch`` epochs of global rectification: ``CE(beta * sum_j h_j, y)`` over every encoder, the
   head and beta (``forward_grad``).

Evaluation predicts with the ensemble ``beta * sum_j h_j`` (``test``), each modality with its learner.

L_GA is named for gradient alignment: the gradient of the cross-entropy with respect to a learner's
logits is ``softmax(h) - onehot(y)``, so the squared distance between the current and the previous
learner's gradients is exactly the MSE of their softmaxes, the released term. As released it is taken
between two *detached* tensors (``mse_criterion(out_obj.detach().softmax(1), pre_out_obj.detach()
.softmax(1))``), so it adds a value with zero gradient; ``ga="paper"`` (the default) lets its gradient
reach the current learner, ``ga="released"`` reproduces the constant, ``ga="off"`` drops it.

Defaults (``train.py`` argparse and every README command): ``weight1`` 5 (CREMA-D; 4 for AVE and
ModelNet40; ``train_MSA.py`` 1), ``weight2`` 1 (``train_MSA.py`` 0.25), ``alpha`` 0.5 (the GA weight),
``boost_rate`` 1.0 (its initial value), ``epochs_per_stage`` 4, ``correct_epoch`` 4, ``hidden`` 256
(``Head``; ``None`` = the single linear ``MHead`` of ``train_MSA.py``). The authors train with SGD (lr
0.01, momentum 0.9, weight decay 5e-4), a fresh optimizer per phase; here the run's optimizer trains.

Deviations, each with the option that undoes it where one exists:

- ``ga="paper"``: the GA term has a gradient (released: none; ``ga="released"``).
- ``optimizer_state="keep"``: the run's optimizer keeps its state across phases (the authors build a
  fresh SGD per phase, dropping the momentum; ``optimizer_state="reset"`` drops the optimizer state at
  each phase's first epoch, and needs ``balancer.check_optimizer(optimizer)``).
- Every learner is in the ensemble from stage 0: the README's configuration (``--use_pretrain``, both
  learners added before stage 0), here from the encoders as they are. Without ``--use_pretrain`` the
  released code starts from an empty ensemble (a constant ``c0``) and adds each learner after its first
  stage; that path is not reproduced.
- Any M >= 2, modalities in turn in the model's order (``order`` changes it); the authors' scripts are
  two- and three-modal with the same cyclic rule (``train_MSA.py``: text, visual, audio, ``pre_model`` the
  previous one).
- Unequal feature sizes are zero-padded to the widest before the shared head (the authors' are all 512).
- The learner parameters outside the stage get no gradient (``None``), so they stay where they are;
  the model's own fusion head is never trained (the ensemble replaces it), so under DDP the run needs
  ``find_unused_parameters`` (``requirements.unused_parameters``).
- No stage loop of 1000 stages and no learning-rate decay per 30 stages (the run's scheduler owns the
  learning rate); no checkpoint of the best test accuracy.

Cost: one stage is ``epochs_per_stage + correct_epoch`` epochs (8 by default), each one forward pass of
the model per batch, as joint training; a learner epoch backpropagates through one encoder only. Each
modality trains alone for ``epochs_per_stage`` of every ``M * (epochs_per_stage + correct_epoch)`` epochs.

``stats()``: ``stage`` (the stage index, counted from 0 over the whole run), ``learner/<m>`` (1 for the
modality whose learner trains this epoch, 0 in every entry during rectification), ``rectify`` (1 in a
rectification epoch), ``boost_rate``, ``recon_weight`` (the batch mean of ``w1 - w2 p_F(y)``, learner
epochs) and ``ga`` (the L_GA value, learner epochs after stage 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch, DriverError
from .heads import head_sizes
from .registry import register_balancer
from .stages import Schedule, Stage, StageAt

GA_MODES = ("paper", "released", "off")


def reconboost_loss(
    learner: Tensor,
    others: Sequence[Tensor],
    target: Tensor,
    boost_rate: Tensor,
    *,
    weight1: float,
    weight2: float,
    class_mean: bool = True,
) -> tuple[Tensor, Tensor]:
    """The boosting loss of one learner and its per-sample reconcilement weights ``w1 - w2 p_F(y)``.

    ``F = boost_rate * sum(others)`` is detached (the other learners and the boost rate do not train in
    this phase); with no other learner ``p_F(y) = 1``. ``class_mean`` divides by the number of classes, as
    the released ``.mean(-1)`` over the one-hot's classes does.
    """
    if others:
        ensemble = boost_rate.detach() * torch.stack([o.detach() for o in others]).sum(0)
        p_f = ensemble.float().softmax(1).gather(1, target[:, None]).squeeze(1)
    else:
        p_f = torch.ones(target.shape, device=learner.device)
    weights = weight1 - weight2 * p_f
    log_p = learner.float().log_softmax(1).gather(1, target[:, None]).squeeze(1)
    loss = -(weights * log_p).mean()
    if class_mean:
        loss = loss / learner.shape[1]
    return loss, weights


def ga_loss(learner: Tensor, previous: Tensor, mode: str) -> Tensor:
    """The memory-consolidation (gradient-alignment) term: MSE of the two learners' softmaxes.

    ``"paper"``: the gradient reaches ``learner``; ``"released"``: both detached (zero gradient).
    """
    p = learner.float().softmax(1)
    if mode == "released":
        p = p.detach()
    return F.mse_loss(p, previous.detach().float().softmax(1))


class SharedHead(nn.Module):
    """The learners' common head: Linear(d, hidden), ReLU, Linear(hidden, K), or Linear(d, K) without hidden.

    Initialised as ``nn.Linear`` is (uniform in ``±1/sqrt(fan_in)``), from a generator seeded with ``seed``.
    """

    def __init__(self, width: int, classes: int, hidden: int | None, seed: int) -> None:
        super().__init__()
        sizes = [width, classes] if hidden is None else [width, hidden, classes]
        layers: list[nn.Module] = []
        gen = torch.Generator().manual_seed(seed)
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            linear = nn.Linear(n_in, n_out)
            bound = 1.0 / math.sqrt(n_in)
            with torch.no_grad():
                linear.weight.copy_(torch.rand(n_out, n_in, generator=gen) * 2 * bound - bound)
                linear.bias.copy_(torch.rand(n_out, generator=gen) * 2 * bound - bound)
            layers += [linear] if i == len(sizes) - 2 else [linear, nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class BoostRate(nn.Module):
    """The ensemble's learnable scale beta (``DynamicNet.boost_rate``), a module so that it loads in place."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))


@register_balancer("reconboost")
class ReconBoost(Balancer):
    """ReconBoost (Hua et al., ICML 2024): alternating boosting learners with a global rectification.

    Args:
        model: the contract model.
        weight1, weight2: the reconcilement weight ``w1 - w2 p_F(y)`` (5 and 1).
        alpha: weight of the GA (memory consolidation) term (0.5).
        ga: ``"paper"`` (its gradient reaches the learner), ``"released"`` (zero gradient) or ``"off"``.
        boost_rate: initial value of the learnable ensemble scale beta (1.0).
        epochs_per_stage: epochs of one learner per stage (4).
        correct_epoch: epochs of global rectification per stage (4; 0 = none).
        head: ``"shared"`` (the authors' common head, owned by the balancer) or ``"model"`` (each
            modality's unimodal logits from the model; needs a splittable fusion).
        hidden: hidden width of the shared head (256); ``None`` = one linear layer.
        class_mean: divide the boosting loss by the number of classes, as released (True).
        order: the modalities' turn order (default: the model's).
        optimizer_state: ``"keep"`` or ``"reset"`` (drop the optimizer state at each phase's first epoch).
        feature_dims, num_classes: sizes of the shared head, for a model that declares neither.
    """

    unused_parameters = True

    def __init__(
        self,
        model: nn.Module,
        *,
        weight1: float = 5.0,
        weight2: float = 1.0,
        alpha: float = 0.5,
        ga: Literal["paper", "released", "off"] = "paper",
        boost_rate: float = 1.0,
        epochs_per_stage: int = 4,
        correct_epoch: int = 4,
        head: Literal["shared", "model"] = "shared",
        hidden: int | None = 256,
        class_mean: bool = True,
        order: Sequence[str] | None = None,
        optimizer_state: Literal["keep", "reset"] = "keep",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        self.weight1 = self.check_option("weight1", weight1)
        self.weight2 = self.check_option("weight2", weight2, low=0)
        self.alpha = self.check_option("alpha", alpha, low=0)
        self.ga = self.check_option("ga", ga, choices=GA_MODES)
        beta0 = self.check_option("boost_rate", boost_rate)
        epochs_per_stage = self.check_option("epochs_per_stage", epochs_per_stage, low=1, integer=True)
        correct_epoch = self.check_option("correct_epoch", correct_epoch, low=0, integer=True)
        self.head_mode = self.check_option("head", head, choices=("shared", "model"))
        self.class_mean = bool(class_mean)
        self.optimizer_state = self.check_option(
            "optimizer_state", optimizer_state, choices=("keep", "reset")
        )
        self.order = self._check_order(order)
        stages = []
        for m in self.order:
            stages.append(Stage(f"learn:{m}", epochs_per_stage))
            if correct_epoch:
                stages.append(Stage(f"rectify:{m}", correct_epoch))
        self.cycle = Schedule(stages)  # one round of stages; the run repeats it
        self.stage_epochs = epochs_per_stage + correct_epoch
        ref = next(model.parameters())
        self.head: nn.Module | None = None
        if self.head_mode == "shared":
            if hidden is not None:
                hidden = self.check_option("hidden", hidden, low=1, integer=True, allow_none=True)
            dims, classes = head_sizes(model, self.modalities, feature_dims, num_classes, self.name)
            self.width = max(dims.values())
            self.head = SharedHead(self.width, classes, hidden, self.seed).to(ref.device, ref.dtype)
            self.add_state("head", self.head)
        elif getattr(model, "auxiliary_heads", False):
            raise ValueError(
                "Balancer 'reconboost' option 'head' must be 'shared' for this model, found 'model': its fusion "
                f"({type(getattr(model, 'fusion', model)).__name__}) computes the unimodal logits with auxiliary "
                "heads on detached features, so no learner loss would reach the encoders. Use head='shared' (the "
                "authors' common head on the encoder features) or a splittable fusion (concat, sum, weighted)."
            )
        self.boost = BoostRate(beta0).to(ref.device, ref.dtype)
        self.add_state("boost", self.boost)  # a module: loaded in place, so the optimizer keeps it
        self.add_state("reset_epoch", -1)  # the last epoch whose optimizer state was dropped

    def _check_order(self, order: Sequence[str] | None) -> list[str]:
        if order is None:
            return list(self.modalities)
        order = list(order)
        if sorted(order) != sorted(self.modalities):
            raise ValueError(
                f"Balancer 'reconboost' option 'order' must name every modality once, expected a permutation "
                f"of {self.modalities}, found {order}."
            )
        return order

    # ------------------------------------------------------------------ the schedule
    def stage_at(self, epoch: int) -> tuple[int, StageAt]:
        """The stage index over the whole run and where ``epoch`` falls in the current round of stages."""
        active = epoch - self.first_epoch
        return active // self.stage_epochs, self.cycle.at(active % (self.stage_epochs * len(self.order)))

    def phase(self) -> tuple[int, str, str]:
        """This epoch's stage index, phase (``"learn"`` or ``"rectify"``) and modality."""
        stage, at = self.stage_at(self.epoch)
        kind, modality = at.stage.name.split(":")
        return stage, kind, modality

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; with ``optimizer_state="reset"``, drop the optimizer state at a phase's start."""
        super().set_epoch(epoch)
        if self.optimizer_state != "reset" or not self.active or self.reset_epoch == self.epoch:
            return
        if not self.stage_at(self.epoch)[1].first_epoch:
            return
        optimizer = self.optimizer
        if optimizer is None:
            raise DriverError(
                "reconboost with optimizer_state='reset' drops the optimizer state at each phase start, as the "
                "authors build a fresh SGD per phase: call balancer.check_optimizer(optimizer) once before "
                "the first start_epoch (the reference trainer and the Lightning callback do; a loop that only "
                "calls train_step must call it too, as train_step comes after start_epoch)."
            )
        optimizer.state.clear()
        self.reset_epoch = self.epoch

    # ------------------------------------------------------------------ learners
    def parameters(self) -> Iterator[nn.Parameter]:
        """The shared head's parameters and the boost rate (the optimizer must hold them)."""
        if self.head is not None:
            yield from self.head.parameters()
        yield self.boost.value

    @property
    def boost_rate(self) -> nn.Parameter:
        """The learnable ensemble scale beta."""
        return self.boost.value

    def learner_logits(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each learner's logits ``h_m``: the shared head on modality m's features (or the model's logits)."""
        if self.head is None:
            return dict(out.unimodal_logits)
        feats = output_features(
            out,
            "reconboost's learners classify each modality's features with one shared head",
            ", or pass head='model' (the model's own unimodal logits)",
        )
        weight = self.head.net[0].weight
        if weight.device != feats[self.modalities[0]].device:
            self.head.to(feats[self.modalities[0]].device)
        logits = {}
        for m in self.modalities:
            z = feats[m]
            if z.dim() != 2 or z.shape[1] > self.width:
                raise ValueError(
                    f"Balancer 'reconboost': its shared head takes pooled (B, d) features with d <= {self.width}, "
                    f"found out.features[{m!r}] of shape {tuple(z.shape)}. Pass feature_dims= matching them."
                )
            if z.dtype != weight.dtype and not torch.is_autocast_enabled(z.device.type):
                z = z.to(weight.dtype)
            logits[m] = self.head(F.pad(z, (0, self.width - z.shape[1])))
        return logits

    def ensemble(self, logits: Mapping[str, Tensor]) -> Tensor:
        """The boosted ensemble ``beta * sum_m h_m``."""
        beta = self.boost_rate.to(next(iter(logits.values())).device)
        return beta * torch.stack(list(logits.values())).sum(0)

    # ------------------------------------------------------------------ hooks
    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        stage, kind, m = self.phase()
        logits = self.learner_logits(out)
        self.record("stage", target.new_full((), stage, dtype=torch.float32))
        self.record("rectify", target.new_full((), float(kind == "rectify"), dtype=torch.float32))
        self.record("boost_rate", self.boost_rate.detach().float().reshape(()))
        trained = self.modalities.index(m) if kind == "learn" else -1
        self.record("learner", (torch.arange(len(self.modalities), device=target.device) == trained).float())
        if kind == "rectify":
            return F.cross_entropy(self.ensemble(logits), target)
        others = [logits[n] for n in self.modalities if n != m]
        loss, weights = reconboost_loss(
            logits[m], others, target, self.boost_rate,
            weight1=self.weight1, weight2=self.weight2, class_mean=self.class_mean,
        )  # fmt: skip
        self.record("recon_weight", weights.detach().mean())
        if self.ga != "off" and stage > 0:
            previous = self.order[(self.order.index(m) - 1) % len(self.order)]
            ga = ga_loss(logits[m], logits[previous], self.ga)
            self.record("ga", ga.detach())
            loss = loss + self.alpha * ga
        return loss

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """The boosted ensemble of every learner, ``beta * sum_m h_m``."""
        return self.ensemble(self.learner_logits(out))

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's learner, ``h_m``."""
        return self.learner_logits(out)
