"""Greedy: re-balancing the conditional learning speed through MMTM gates (Wu et al., ICML 2022)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mmtm import MMTM_FUSION, MMTMGate
from ..types import MultimodalOutput
from .base import Balancer, Batch
from .registry import register_balancer

GreedyObjective = Literal["unimodal_sum", "fused"]
AverageSource = Literal["own", "first"]


def learning_speeds(groups: list[list[nn.Parameter]]) -> Tensor:
    """``sum ||grad||^2 / sum ||theta||^2`` over each group of parameters (a missing gradient counts as 0)."""
    out = []
    for params in groups:
        wn = torch.stack([p.detach().float().pow(2).sum() for p in params]).sum()
        grads = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        gn = torch.stack(grads).sum() if grads else torch.zeros_like(wn)
        out.append(gn / wn)
    return torch.stack(out)


def balance_ratios(bypass: Tensor, main: Tensor) -> Tensor:
    """``BDR_m = log10(bypass_m / main_m)`` from the accumulated learning speeds of each modality."""
    return torch.log10(bypass / main)


@register_balancer("greedy")
class Greedy(Balancer):
    """Wu, Jastrzebski, Cho & Geras, "Characterizing and Overcoming the Greedy Nature of Learning in
    Multi-modal Deep Neural Networks", ICML 2022 ("guided" training).

    The model must fuse in the middle through MMTM gates (``model.fusion=mmtm``,
    :class:`~equimodal.models.mmtm.MMTMClassifier`); a late-fusion model is refused. After every step the
    method measures each modality's *conditional learning speed*: the relative gradient energy
    ``sum ||g||^2 / sum ||theta||^2`` of its uni-modal "main" parameters (its encoder and head) and of its
    "bypass" parameters (every gate's squeeze layer, shared, and its own excitation layer), accumulated
    over training, and ``BDR_m = log10(bypass_m / main_m)``. With ``d = BDR_0 - BDR_1``, when ``|d| >
    epsilon`` (from ``starting_epoch`` on) it opens a re-balancing window of ``window`` steps for the
    modality ``argmax BDR`` (``d > 0``: modality 0): in those steps that modality's MMTM excitation is its
    running average, so it gets no sample-wise help from the others and must learn on its own. Inside a
    window nothing is accumulated and no new decision is made. For ``M > 2`` the window goes to
    ``argmax_m BDR_m`` when ``max BDR - min BDR > epsilon`` (for two modalities the same rule).

    Official code (github.com/nyukat/greedy_multimodal_learning): ``src/callbacks.py``
    (``Bias_Mitigation_Strong.compute_BDR`` and ``on_backward_end``), ``src/balanced_mmtm.py``
    (``MMTM_mitigate.forward``: the running averages and the replacement), ``src/model.py``
    (``MMTM_MVCNN``), ``train.py`` (``blend_loss``), ``configs/training_guided.gin`` (the defaults).

    Args:
        epsilon: threshold on ``|d|`` (official 0.01, ``training_guided.gin``; BalanceBenchmark's
            ``Greedy_trainer.py`` uses 0.001).
        window: steps per re-balancing window (``curation_windowsize = 5``).
        starting_epoch: first epoch (0-based) in which windows open (official ``starting_epoch = 2``,
            1-based); the speeds are accumulated from the first step.
        objective: ``"unimodal_sum"`` (official ``blend_loss``: the sum of every head's CE) or ``"fused"``
            (CE of the mean of the heads' logits).
        average_source: ``"own"`` (default: each modality's running average tracks its own excitation, as
            the paper describes) or ``"first"`` (the official code updates both averages with the first
            modality's excitation, which looks like a bug; needs equal channels per gate).
        window_in_eval: also replace the excitation in evaluation forwards during a window (the official
            model keeps its curation mode through validation); default ``False``.
        **options: ``start_epoch`` / ``end_epoch`` / ``seed`` of :class:`Balancer`.

    Deviations: the running averages are kept by the balancer from the all-reduced batch means of the
    training steps (one process and DDP agree), not per forward call inside the gate: evaluation forwards
    do not update them, and the replacement in a step uses the average up to the previous step (the
    official one already includes the current batch's mean, a weight of ``1/(n+1)``). A non-finite step
    changes nothing. Cost: none beyond two gradient norms per parameter per step. ``stats()``: ``d``
    (``BDR_0 - BDR_1``; ``max - min`` for ``M > 2``), ``bdr/<m>``, ``window/<m>`` (1 when this step's
    forward replaced ``m``'s excitation; its epoch mean times the steps is the window steps).
    """

    model_fusion = MMTM_FUSION

    def __init__(
        self,
        model: nn.Module,
        *,
        epsilon: float = 0.01,
        window: int = 5,
        starting_epoch: int = 1,
        objective: GreedyObjective = "unimodal_sum",
        average_source: AverageSource = "own",
        window_in_eval: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        self.epsilon = self.check_option("epsilon", epsilon, low=0, hint="official 0.01")
        self.window = self.check_option("window", window, low=1, integer=True, hint="official 5")
        self.starting_epoch = self.check_option("starting_epoch", starting_epoch, low=0, integer=True)
        self.objective_kind = self.check_option("objective", objective, choices=("unimodal_sum", "fused"))
        self.average_source = self.check_option("average_source", average_source, choices=("own", "first"))
        self.window_in_eval = self.check_option("window_in_eval", window_in_eval, choices=(True, False))
        self.gates = self._find_gates(model)
        if self.average_source == "first":
            for k, gate in enumerate(self.gates):
                if len(set(gate.channels.values())) > 1:
                    raise ValueError(
                        f"Balancer 'greedy' option 'average_source' must be 'own' for gates of unequal widths, "
                        f"found 'first' with gate {k} channels {gate.channels}."
                    )
        for gate in self.gates:
            gate.override_in_eval = self.window_in_eval
        self.groups = self._parameter_groups(model)
        sizes = [c for gate in self.gates for c in gate.channels.values()]
        num = len(self.modalities)
        self.add_state("speed", torch.zeros(2, num))  # accumulated speeds: bypass (row 0), main (row 1)
        self.add_state("remaining", torch.zeros((), dtype=torch.long))  # window steps left
        self.add_state("caring", torch.zeros((), dtype=torch.long))  # the modality of the window
        self.add_state("average", torch.zeros(sum(sizes)))  # running excitations, per gate and modality
        self.add_state("seen", torch.zeros(()))  # steps averaged
        self.add_stat("excitation", torch.zeros(sum(sizes)))
        self.add_stat("samples", torch.zeros(()))
        self._push()

    def _find_gates(self, model: nn.Module) -> list[MMTMGate]:
        gates = getattr(model, "gates", None)
        found = [g for g in gates if isinstance(g, MMTMGate)] if isinstance(gates, nn.ModuleList) else []
        if not found:
            raise ValueError(
                "Balancer 'greedy' needs mid fusion through MMTM gates (model.gates: an nn.ModuleList of "
                f"MMTMGate), found a {type(model).__name__} with fusion "
                f"{type(getattr(model, 'fusion', None)).__name__}. Build an equimodal.models.MMTMClassifier, "
                "or set model.fusion=mmtm in the config."
            )
        return found

    def _parameter_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Bypass groups (shared squeeze + own excitation of every gate), then main groups (encoder + head)."""
        heads = getattr(model, "heads", None)
        bypass, main = [], []
        for m in self.modalities:
            bypass.append(
                [p for g in self.gates for p in (*g.squeeze.parameters(), *g.excite[m].parameters())]
            )
            own = [*model.encoders[m].parameters(), *(heads[m].parameters() if heads is not None else ())]
            main.append([p for p in own if p.requires_grad])
        return bypass + main

    def _push(self) -> None:
        """Set every gate's override from the state: the window's modality uses its running average."""
        if not self.active:
            for gate in self.gates:
                gate.set_override(None)
            return
        device = self.device  # a state loaded on resume stays where it was until the next step moves it
        mask = ((self._indices() == self.caring) & (self.remaining > 0)).to(device)
        values = self.average.to(device).split([c for gate in self.gates for c in gate.channels.values()])
        k = 0
        for gate in self.gates:
            gate.set_override(mask, {m: values[k + i] for i, m in enumerate(gate.channels)})
            k += len(gate.channels)

    def _indices(self) -> Tensor:
        return torch.arange(len(self.modalities), device=self.caring.device)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._push()

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self._push()

    def observe(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> None:
        """Add the batch sums of every gate's excitations (kept by its last training forward)."""
        sums = []
        for gate in self.gates:
            if gate.excitation_sums is None:
                raise RuntimeError(
                    "greedy found an MMTM gate that ran no training-mode forward: call model.train() and "
                    "model(batch) before balancer.loss(out, labels)."
                )
            sums += [gate.excitation_sums[m].float() for m in gate.channels]
        self.excitation += torch.cat(sums).to(self.excitation.device)
        self.samples += target.shape[0]

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The sum of every head's CE (official ``blend_loss``), or the fused CE."""
        if self.objective_kind == "fused":
            return F.cross_entropy(out.logits, target)
        return sum(F.cross_entropy(out.unimodal_logits[m], target) for m in self.modalities)

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        """Accumulate the speeds, decide on a window, update the running averages; gradients are unchanged."""
        finite = self.step_finite
        num = len(self.modalities)
        in_window = self.remaining > 0
        speeds = learning_speeds(self.groups).view(2, num).to(self.speed)
        self.speed = torch.where(in_window | ~finite, self.speed, self.speed + speeds)
        bdr = balance_ratios(self.speed[0], self.speed[1])
        gap = bdr.max() - bdr.min()
        start = ~in_window & finite & (gap > self.epsilon) & (self.epoch >= self.starting_epoch)
        self.record("window", ((self._indices() == self.caring) & in_window).float())
        self.caring = torch.where(start, bdr.argmax(), self.caring)
        left = torch.where(in_window, self.remaining - 1, start.long() * self.window)
        self.remaining = torch.where(finite, left, self.remaining)
        self._update_average(finite)
        self.record("d", bdr[0] - bdr[1] if num == 2 else gap)
        self.record("bdr", bdr)
        self._push()

    def _update_average(self, finite: Tensor) -> None:
        """Cumulative mean over steps of each step's batch-mean excitation (all-reduced over ranks)."""
        mean = self.excitation / self.samples.clamp_min(1)
        if self.average_source == "first":  # the official update: every modality tracks the first's
            parts, k = [], 0
            for gate in self.gates:
                widths = list(gate.channels.values())
                first = mean[k : k + widths[0]]
                parts += [first] * len(widths)
                k += sum(widths)
            mean = torch.cat(parts)
        new = (mean + self.average * self.seen) / (self.seen + 1)
        self.average = torch.where(finite, new, self.average)
        self.seen = torch.where(finite, self.seen + 1, self.seen)
