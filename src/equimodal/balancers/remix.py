"""Data Remixing (Ma, Chen and Deng, "Improving Multimodal Learning Balance and Sufficiency through Data
Remixing", ICML 2025): after a multitask warm-up, each epoch gives every training sample to the one
modality that is least sure of it, and trains it with the other modalities zeroed, in batches of one
modality each.

Official code (MatthewMaxy/Remix_ICML2025): ``train.py`` (``kl_divergence``, ``remix``, ``train_epoch``,
``special_train_epoch``, the epoch loop of ``main``), ``models/models.py`` (``AVClassifier.forward``: the
``mode`` argument zeroes the other modality's pooled feature before the concat head; ``head_audio`` and
``head_video`` are separate linear heads), ``scripts/run_train.sh``. The pure math
(:func:`kl_to_uniform`, :func:`assign_modalities`, :func:`grouped_order`) is in small functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum
from ..models.fusion import Fusion
from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch, DriverError
from .epoch_data import EpochData
from .heads import check_heads_mode, own_heads
from .passes import inference, sample_indices
from .plan import INDEX_KEY, EpochPlan
from .registry import register_balancer
from .stages import Schedule, Stage, StageAt

log = logging.getLogger(__name__)

ZERO_MODES = ("feature", "input")
BATCH_MODES = ("grouped", "mixed")


def kl_to_uniform(probs: Tensor) -> Tensor:
    """``KL(p || U) = sum_c p_c log2(p_c C)`` per row of ``probs`` ``(B, C)``, in float64.

    As the code's ``kl_divergence``: probabilities clipped to ``[1e-9, 1]`` (not renormalised), base-2
    logarithm, ``C`` the number of classes (the code hard-codes 6; here the logits' width).
    """
    p = probs.double().clamp(1e-9, 1.0)
    return (p * torch.log2(p * probs.shape[1])).sum(1)


def assign_modalities(kl: Tensor) -> Tensor:
    """The modality each sample trains on: the one whose prediction is closest to uniform (smallest KL).

    ``kl`` is ``(M, N)``; returns ``(N,)`` long. A tie goes to the last of the tied modalities, as the
    code's ``if KL_audio < KL_video: audio else video`` gives a tie to its second modality.
    """
    m = kl.shape[0]
    return (m - 1) - kl.flip(0).argmin(0)


def grouped_order(assignment: Tensor, num_modalities: int, generator: torch.Generator) -> Tensor:
    """Sample indices grouped by assigned modality, each group in a random order, groups in reverse
    modality order (the code trains its video subset, then its audio subset)."""
    perm = torch.randperm(assignment.numel(), generator=generator)
    groups = [perm[assignment[perm] == j] for j in reversed(range(num_modalities))]
    return torch.cat(groups)


class SampleAssignment:
    """Each training sample's modality in the current epoch (``value``: ``(N,)`` long, or ``None`` in the
    warm-up); saved with the balancer's state, so a run resumed mid-epoch trains each sample as before."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.value is None else {"value": self.value.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        value = state.get("value")
        self.value = None if value is None else torch.as_tensor(value).long()

    def on(self, device: torch.device) -> Tensor:
        """The assignment on ``device`` (moved there once, without a host read)."""
        if self.value is None:
            raise ValueError("No assignment yet.")  # pragma: no cover - the caller checks
        if self.value.device != device:
            self.value = self.value.to(device)
        return self.value


@register_balancer("remix")
class Remix(Balancer):
    """Data Remixing (Ma et al., ICML'25): per-sample modality assignment, unimodal batches after a warm-up.

    Warm-up (``warmup_epochs``, the code's ``train_epoch``): ``L = CE(f, y) + w sum_m CE(h_m, y)`` on all
    data, ``h_m`` the unimodal logits (the code's ``head_audio``/``head_video``: separate linear heads on
    the pooled features, here :mod:`~equimodal.balancers.heads`). Then at each epoch start (``remix``), an
    eval-mode, no-grad pass over the training split gives each sample's ``KL(softmax(h_m) || U)``
    (:func:`kl_to_uniform`) per modality; the sample goes to the modality with the smallest one
    (:func:`assign_modalities`: the modality that knows it least). The epoch then trains every sample once
    (no copies, no sample left out), with every modality but its own zeroed, on
    ``L_i = CE(f_i^{(m_i)}, y_i) + gamma CE(h_{m_i}, y_i)`` (``special_train_epoch``), averaged over the
    batch, ``f^{(m)}`` the fused logits with only modality ``m``'s feature kept.

    How the code's per-modality batches are reproduced: the code writes one dataset per modality and trains
    all batches of one (video), then all of the other (audio), each shuffled. Here the epoch plan
    (:class:`~equimodal.balancers.plan.EpochPlan`) has one entry per sample, grouped by modality in that
    order (reverse modality order), each group shuffled by a generator seeded with ``seed + epoch`` (the same
    on every rank), and ``shuffle=False``, so the loader's consecutive batches hold one modality each;
    only a batch that straddles two groups mixes them (at most ``M - 1`` per epoch and rank, where the code
    has a smaller last batch per group). Each sample's own modality is looked up in the balancer's
    assignment by its index (``batch["index"]``), so even a mixed batch trains each sample as its group.
    The scores are filled by index and all-reduced under DDP, so every rank builds the same plan; the
    assignment is saved in the state with the plan (a resumed run continues the same epoch). The pass is
    the code's: eval mode, no grad, over the training split (its ``mode='val'`` dataset is ``train.csv``
    with test-time transforms), from the model as it stands at the epoch start.

    Args:
        model: a contract model; with ``zero="feature"`` its ``model.fusion`` must be an equimodal
            ``Fusion`` (every ``MultimodalClassifier``) and ``out.features`` the features it fuses.
        warmup_epochs: epochs of the multitask warm-up; default 10 (argparse ``--warmup 10`` and
            ``scripts/run_train.sh``). 0 remixes from the first epoch.
        warmup_weight: ``w``; default 0.5 (argparse ``--alpha 0.5`` audio and ``--beta 0.5`` video; one
            weight for every modality here).
        remix_weight: ``gamma``; default 1 (argparse ``--gamma1 1`` video and ``--gamma2 1`` audio).
        zero: ``"feature"`` (default, the code: ``AVClassifier.forward`` sets the other modality's pooled
            feature to 0 after its encoder, which still runs on its real input, and before the fusion
            head; here the fusion runs again on the features with the others replaced by zeros, one extra
            fusion-head forward per step) or ``"input"`` (ours: the plan zeroes the other modalities'
            input tensors, so their encoders see zeros; works for any contract model).
        batches: ``"grouped"`` (default, the code's unimodal batches, see above) or ``"mixed"`` (ours: the
            entries shuffled together; each sample still trains as its modality).
        heads: ``"separate"`` (default, the code's ``head_audio``/``head_video``) or ``"shared"`` (ours: the
            model's unimodal logits, the fusion head's blocks; refused on auxiliary-head fusions).
        feature_dims, num_classes: sizes of the separate heads, for a model that declares neither.
        start_epoch, end_epoch: the method's window (the warm-up counts from ``start_epoch``); seed: the
            heads' initialisation and the groups' order.

    Deviations from the official code: any ``M >= 2`` (argmin over the modalities; a tie goes to the last
    tied modality, the code's rule for two); the class count is the logits' width (the code's
    ``kl_divergence(..., 6)`` is CREMA-D's); one weight for all modalities in each stage (the code's two
    are equal); groups in reverse modality order, concatenated (see above); the assignment is kept in
    memory and in the state instead of CSV files under ``./data``. The code's optimizer and schedule (Adam
    5e-5, weight decay 1e-4, StepLR 30 / 0.1, batch 64, 60 epochs) are the driver's, not the balancer's.

    Cost: the warm-up is the multitask baseline (one linear head per modality); each remix epoch adds one
    eval forward pass over the training split (about a third of a training epoch) and, with
    ``zero="feature"``, a second fusion-head forward per step.

    ``stats()``: ``stage`` (0 warm-up, 1 remix), ``assigned/<m>`` (how many training samples this epoch
    trains as modality ``m``; 0 in the warm-up), ``fused_loss``, ``uni_loss/<m>`` (each head's CE on the
    batch). Each remix epoch also logs the counts (``log.info``); they are kept as the state ``counts``.
    """

    plans_data = True

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup_epochs: int = 10,
        warmup_weight: float = 0.5,
        remix_weight: float = 1.0,
        zero: Literal["feature", "input"] = "feature",
        batches: Literal["grouped", "mixed"] = "grouped",
        heads: Literal["separate", "shared"] = "separate",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        warmup = self.check_option("warmup_epochs", warmup_epochs, low=0, integer=True, hint="the code: 10")
        self.warmup_weight = self.check_option("warmup_weight", warmup_weight, low=0, hint="the code: 0.5")
        self.remix_weight = self.check_option("remix_weight", remix_weight, low=0, hint="the code: 1")
        self.zero = self.check_option("zero", zero, choices=ZERO_MODES)
        self.batches = self.check_option("batches", batches, choices=BATCH_MODES)
        self.check_option("heads", heads, choices=("separate", "shared"))
        if self.zero == "feature" and not isinstance(getattr(model, "fusion", None), Fusion):
            found = type(getattr(model, "fusion", None)).__name__
            raise ValueError(
                "Balancer 'remix' option 'zero' must be 'input' for this model, found 'feature': zeroing the "
                "other modalities' features before the fusion (the authors' rule) reruns model.fusion, which "
                f"must be an equimodal Fusion (a MultimodalClassifier's), found {found}."
            )
        self.schedule = Schedule(
            [Stage("warmup", warmup), Stage("remix", None)] if warmup > 0 else [Stage("remix", None)]
        )
        self.heads = None
        if check_heads_mode(heads, model, self.name):
            own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)
        self.add_state("assignment", SampleAssignment())
        self.add_state("counts", torch.zeros(len(self.modalities), dtype=torch.long), rollback=False)

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> StageAt:
        """Where the current epoch falls in the schedule (counted from the window's first epoch)."""
        return self.schedule.at(max(self.epoch - self.first_epoch, 0))

    @property
    def remixing(self) -> bool:
        return self.stage.stage.name == "remix"

    # ------------------------------------------------------------------ the epoch's plan
    def on_epoch_start(self, data: EpochData) -> None:
        """In a remix epoch: score every training sample, assign it a modality and plan the epoch."""
        if not self.remixing:
            self.assignment.value = None
            self.counts = torch.zeros_like(self.counts)
            return
        assignment = assign_modalities(self.sample_scores(data))
        self.assignment.value = assignment
        self.counts = torch.bincount(assignment, minlength=len(self.modalities))
        self.set_plan(self.make_plan(assignment))
        counts = dict(zip(self.modalities, self.counts.tolist(), strict=True))
        log.info("Data Remixing epoch %d: training samples per modality %s", self.epoch, counts)

    def sample_scores(self, data: EpochData) -> Tensor:
        """``(M, N)`` float64 on the CPU: each training sample's KL to uniform per modality (eval mode, no
        grad), filled by index and averaged over the ranks that saw the sample."""
        n, num = int(data.size), len(self.modalities)  # type: ignore[arg-type]
        device = self.device
        total = torch.zeros(num + 1, n, dtype=torch.float64, device=device)  # last row: times seen
        for out, _, inputs in inference(self.model, data, "indexed"):
            index = sample_indices(inputs).to(device)
            logits = self.unimodal_logits(out)
            for j, m in enumerate(self.modalities):
                total[j].index_add_(0, index, kl_to_uniform(logits[m].softmax(1)).to(device))
            total[num].index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64, device=device))
        total = all_reduce_sum(total).cpu()
        seen = total[num]
        missing = int((seen == 0).sum())
        if missing:
            raise ValueError(
                "remix scores every training sample each epoch, but the indexed pass (EpochData.indexed) "
                f"left {missing} of the {n} samples (EpochData.size) unseen; pass the whole training split, "
                "each batch carrying its samples' indices (equimodal.balancers.plan.indexed_loader)."
            )
        return total[:num] / seen

    def make_plan(self, assignment: Tensor) -> EpochPlan:
        """One entry per sample: grouped by modality (``batches="grouped"``) or shuffled; the other
        modalities' inputs zeroed by the plan with ``zero="input"``."""
        num = len(self.modalities)
        if self.batches == "grouped":
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            indices, shuffle = grouped_order(assignment, num, gen), False
        else:
            indices, shuffle = torch.arange(assignment.numel()), True
        zeroed = None
        if self.zero == "input":
            zeroed = assignment[indices][:, None] != torch.arange(num)[None, :]
        return EpochPlan(indices, zeroed, None, tuple(self.modalities), shuffle=shuffle)

    # ------------------------------------------------------------------ the loss
    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The warm-up's multitask loss, or (remix epochs) each sample's fused CE with only its modality
        kept plus ``gamma`` times its modality's CE."""
        uni = self.unimodal_logits(out)
        ces = torch.stack([F.cross_entropy(uni[m], target, reduction="none") for m in self.modalities], 1)
        self.record("uni_loss", ces.detach().mean(0), self.modalities)
        self.record("assigned", self.counts.float(), self.modalities)
        if not self.remixing:
            fused = F.cross_entropy(out.logits, target)
            self.record("stage", fused.new_zeros(()))
            self.record("fused_loss", fused.detach())
            return fused + self.warmup_weight * ces.mean(0).sum()
        keep = self.sample_modalities(batch, target)[:, None] == torch.arange(
            len(self.modalities), device=target.device
        )
        fused = F.cross_entropy(self.remixed_logits(out, keep), target, reduction="none")
        own = torch.where(keep, ces, torch.zeros_like(ces)).sum(1)
        self.record("stage", fused.new_ones(()))
        self.record("fused_loss", fused.detach().mean())
        return (fused + self.remix_weight * own).mean()

    def sample_modalities(self, batch: Batch | None, target: Tensor) -> Tensor:
        """``(B,)``: the modality each sample of a planned batch trains as (looked up by its index)."""
        if self.assignment.value is None or batch is None or INDEX_KEY not in batch:
            raise DriverError(
                f"remix trains epoch {self.epoch} on its remixed plan: call balancer.start_epoch(epoch, "
                "EpochData(indexed=..., size=...)) at the epoch start and train on "
                "balancer.planned_loader(train_dataset, ...), whose batches carry 'index'."
            )
        assignment = self.assignment.on(target.device)
        return assignment[batch[INDEX_KEY].to(target.device).long()]

    def remixed_logits(self, out: MultimodalOutput, keep: Tensor) -> Tensor:
        """Fused logits with only each sample's own modality: its features alone through the fusion
        (``zero="feature"``), or the model's logits on the plan's zeroed inputs (``zero="input"``)."""
        if self.zero == "input":
            return out.logits
        feats = output_features(out, "remix with zero='feature' zeroes features before the fusion", (
            ", or use zero='input'"
        ))  # fmt: skip
        kept = {}
        for j, m in enumerate(self.modalities):
            z = feats[m]
            mask = keep[:, j].reshape(-1, *([1] * (z.dim() - 1)))
            kept[m] = torch.where(mask, z, torch.zeros_like(z))
        result = self.model.fusion(kept)  # type: ignore[operator]
        return result[0] if isinstance(result, tuple) else result

    # ------------------------------------------------------------------ heads
    def unimodal_logits(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's logits: the separate heads (default) or the model's own."""
        return self.heads.logits(out) if self.heads is not None else dict(out.unimodal_logits)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The separate heads' parameters (put them in the optimizer); none with ``heads="shared"``."""
        return self.heads.parameters() if self.heads is not None else iter(())

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """The heads that the method trains (the reported per-modality accuracy while active)."""
        return self.unimodal_logits(out)
