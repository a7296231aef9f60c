"""AUG (Jiang, Huang & Yang, NeurIPS 2025): boosted classifiers for the weak modality, trained on residuals."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch
from .heads import head_sizes
from .registry import register_balancer

log = logging.getLogger(__name__)


def residual_targets(target: Tensor, prev_logits: Tensor, weight: float) -> Tensor:
    """AUG's residual labels ``y - weight * y * softmax(prev)`` (one-hot ``y``; ``prev`` detached).

    Only the true class keeps mass: ``1 - weight * p_prev(y)``, so a sample the previous classifiers already
    fit counts less for the newest one.
    """
    onehot = F.one_hot(target, prev_logits.shape[-1]).to(prev_logits.dtype)
    return onehot - weight * onehot * torch.softmax(prev_logits.detach(), dim=-1)


def residual_loss(newest: Tensor, prev_logits: Tensor, target: Tensor, weight: float) -> Tensor:
    """Soft-label cross-entropy of the newest classifier against :func:`residual_targets` (batch mean)."""
    soft = residual_targets(target, prev_logits.float(), weight)
    return -(soft * torch.log_softmax(newest.float(), dim=-1)).sum(-1).mean()


def boosting_loss(
    logits: Tensor, prev: Tensor | None, newest: Tensor | None, target: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    """One modality's AUG loss and its residual term.

    Without added classifiers it is ``CE(f, y)``; with them ``CE(f, y) + CE(f - a, y) + CE_soft(a, r)``: the
    whole ensemble ``f``, the ensemble without its newest classifier, and the newest classifier ``a`` on the
    residual labels ``r`` (:func:`residual_targets`).
    """
    loss = F.cross_entropy(logits, target)
    if newest is None or prev is None:
        return loss, loss.new_zeros(())
    res = residual_loss(newest, prev, target, weight)
    return loss + F.cross_entropy(prev, target) + res, res.detach()


def weakest_modality(scores: Tensor, tolerance: float) -> int | None:
    """The index of the modality that gets a classifier: the lowest score, when the highest exceeds it by more
    than ``tolerance`` (relative); ``None`` when the scores are within that band."""
    weak = int(torch.argmin(scores))
    return weak if float(scores.max()) > (1.0 + tolerance) * float(scores[weak]) else None


def check_interval(check_every: int | None, epochs: int | None) -> int:
    """Epochs between classifier assignments: ``check_every``, else the official rule for a run of ``epochs``
    epochs (``int(epochs / 10)`` above 10 epochs, else 1), else 1."""
    if check_every is not None:
        return check_every
    if epochs is not None and epochs > 10:
        return int(epochs / 10)
    return 1


def _xavier_normal(layer: nn.Linear, gen: torch.Generator) -> None:
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) * math.sqrt(2.0 / (fan_in + fan_out)))
        layer.bias.zero_()


class BoostedClassifiers(nn.Module):
    """Per modality a base embedding and ``cap`` pre-allocated added embeddings, all ``Linear(d_m, hidden)`` +
    ReLU, and one output layer ``Linear(hidden, C)`` shared by every embedding of every modality."""

    def __init__(self, dims: Mapping[str, int], classes: int, hidden: int, cap: int, seed: int) -> None:
        super().__init__()
        self.base = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.added = nn.ModuleDict(
            {m: nn.ModuleList(nn.Linear(d, hidden) for _ in range(cap)) for m, d in dims.items()}
        )
        self.out = nn.Linear(hidden, classes)
        gen = torch.Generator().manual_seed(int(seed))
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                _xavier_normal(layer, gen)

    def parts(self, m: str, z: Tensor, active: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Modality ``m``'s ensemble logits ``f``, the ensemble without its newest classifier and the newest
        classifier's logits (``None`` for both while no classifier was added)."""
        f = self.out(torch.relu(self.base[m](z)))
        prev = newest = None
        for layer in self.added[m][:active]:
            prev, newest = f, self.out(torch.relu(layer(z)))
            f = f + newest
        return f, prev, newest


@register_balancer("aug")
class AUG(Balancer):
    """AUG (Jiang, Huang & Yang, "Rethinking Multimodal Learning from the Perspective of Mitigating
    Classification Ability Disproportion", NeurIPS 2025): boosting for the weak modality.

    Each modality m has a classifier of its own on its pooled encoder feature ``z_m``: a base embedding
    ``e_m = ReLU(B_m z_m)`` and, as training goes, added embeddings ``ReLU(A_{m,k} z_m)``, all read by one
    output layer ``W`` shared by every modality, so ``f_m = W e_m + sum_k W ReLU(A_{m,k} z_m)``. The loss is
    ``sum_m L_m`` with ``L_m = CE(f_m, y)`` while m has no added classifier, else
    ``CE(f_m, y) + CE(o_m, y) + CE_soft(a_m, y - lambda * y * softmax(o_m).detach())``, where ``a_m`` is the
    newest classifier's logits and ``o_m = f_m - a_m`` the ensemble before it (the residual labels keep mass on
    the true class only: ``1 - lambda p_o(y)``). Over each epoch the confidence ``s_m = sum_i softmax(f_m)_i[y_i]``
    is summed; after the first epoch of the window and after every epoch e with ``(e + 1) % check_every == 0``
    the modality with the lowest ``s_m`` gets one more classifier, active from the next epoch, when the highest
    score exceeds it by more than ``tolerance``. Evaluation is ``sum_m w_m f_m``. The model's own fusion head
    is not trained while AUG is active (the official model has none), and the reported unimodal logits are
    the ``f_m``.

    Official code (``github.com/njustkmg/NeurIPS25-AUG``): ``train_CREMAD.py`` (``train_audio_video``: the
    loss and the scores ``score_a``/``score_v``; ``__main__``: ``check``, ``--lam``, ``--merge_alpha``, the
    SGD settings), ``model/AudioVideo.py`` (``AVGBShareClassifier.classfier``/``add_layer``: shared
    ``fc_out``, ``o_fea``, ``add_fea``), ``utils/utils.py`` (``weight_init``), ``data/crema.json``.

    Defaults and sources: ``residual_weight`` 0.5 (``lambda``, the code's ``- 0.5 * criterion(add_fea, kl)``;
    a comment there says 0.2); ``hidden_dim`` 256 (``embedding_a``/``add_layer``); ``tolerance`` 0.01 (the
    code's band ``lam +- 0.01`` with ``--lam 1.0``); ``check_every``: the code checks every ``int(E / 10)``
    epochs for E > 10 epochs (20 in its 200-epoch run), else every epoch: pass ``epochs=E`` to get that rule,
    or ``check_every`` (default 1 when neither is given); xavier-normal weights and zero biases
    (``weight_init``, ``add_layer``). The code's optimiser is SGD, lr 1e-2, momentum 0.9, weight decay 1e-4,
    StepLR(70, 0.1), batch 64 (``crema.json``): the trainer's configuration, not options here.

    Classifiers are added during training, so all ``max_classifiers`` slots per modality (default 10: the
    code adds at most one per check, about ten checks per run, and ``crema.json`` names ``num_layers: 10``;
    the code itself has no cap) are built at construction, in :meth:`parameters` (the optimizer holds them
    from the start), and activated in order. An inactive slot has ``requires_grad=False``, so it never gets
    a gradient and no optimizer moves it (weight decay included). A modality at the cap gets no more.

    Deviations from the official code, each an option whose default is the authors' intent:

    - ``train_added=True``: the code builds its optimizer before the loop and ``add_layer`` appends layers
      the optimizer never holds, so the added embeddings stay at their initialisation (gradients still pass
      through them into the encoder and ``fc_out``). The method (README: "simultaneously optimizing the
      classification and residual errors") and the code's own residual term for the newest classifier mean
      it to learn; ``False`` reproduces the code as released (the added embeddings are frozen).
    - ``fusion_weights`` (default uniform): the code's evaluation is ``merge_alpha * f_a + (1 - merge_alpha)
      * f_v`` with ``--merge_alpha 0.4`` on CREMA-D (audio, video); pass ``[0.4, 0.6]`` for that.

    Generalisations and choices (no option): one optimizer step on ``sum_m L_m`` per batch, where the code
    takes one step per modality in turn (they differ only through the shared output layer, which the second
    modality sees already updated, and through torch 1.11's ``zero_grad`` leaving zero gradients that give
    the audio parameters a second momentum / weight-decay step per batch); any M >= 2 with the weakest
    modality against the strongest (for M = 2 the code's band is ``0.99 <= s_a / s_v <= 1.01`` and ours
    ``1/1.01 <= s_a / s_v <= 1.01``: they differ in ``s_a / s_v`` in ``[0.99, 0.9901)`` only); ``--lam``
    other than 1 (a preference for the first of two modalities) is not offered; each modality's feature
    width may differ (the code's 512 for both); the scores are summed over ranks (one all-reduce per step,
    with the base class's statistics) so every rank adds the same classifier.

    Cost: no extra pass or epoch; the classifiers' forward (at most ``1 + max_classifiers`` small linear
    layers per modality) and one decision per check (a host read at the epoch start).

    Stats (per step): ``classifiers/<m>`` (active added classifiers), ``weak/<m>`` (1 for the modality the
    last check chose, else 0), ``residual_loss/<m>`` (0 without an added classifier), ``confidence/<m>``
    (mean softmax probability of the true class in the batch).

    Args:
        model: a contract model whose output carries pooled ``features`` (not detached).
        max_classifiers: added classifiers per modality, pre-allocated (the cap).
        hidden_dim: width of every embedding (the shared output layer's input).
        residual_weight: ``lambda`` of the residual labels.
        tolerance: relative score gap below which no classifier is added.
        check_every: epochs between checks (``None``: from ``epochs``, else 1).
        epochs: the run's length, for the official check interval (``None``: unknown).
        fusion_weights: evaluation weights per modality, in modality order (normalised; ``None``: uniform).
        train_added: train the added classifiers (``False``: frozen at initialisation, as the code runs).
        feature_dims, num_classes: sizes for models that declare neither.
        start_epoch, end_epoch: the method's window; seed: the classifiers' initialisation.
    """

    unused_parameters = True  # the model's fusion head gets no gradient from AUG's loss

    def __init__(
        self,
        model: nn.Module,
        *,
        max_classifiers: int = 10,
        hidden_dim: int = 256,
        residual_weight: float = 0.5,
        tolerance: float = 0.01,
        check_every: int | None = None,
        epochs: int | None = None,
        fusion_weights: Sequence[float] | None = None,
        train_added: bool = True,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        self.max_classifiers = self.check_option("max_classifiers", max_classifiers, low=1, integer=True)
        self.hidden_dim = self.check_option("hidden_dim", hidden_dim, low=1, integer=True)
        self.residual_weight = self.check_option("residual_weight", residual_weight, low=0, high=1)
        self.tolerance = self.check_option("tolerance", tolerance, low=0)
        check_every = self.check_option("check_every", check_every, low=1, integer=True, allow_none=True)
        epochs = self.check_option("epochs", epochs, low=1, integer=True, allow_none=True)
        if check_every is not None and epochs is not None:
            raise ValueError(
                f"Balancer 'aug' options check_every ({check_every}) and epochs ({epochs}) both set the check "
                "interval: pass one (epochs=E gives the official int(E / 10) for E > 10, else 1)."
            )
        self.check_every = check_interval(check_every, epochs)
        self.train_added = self.check_option("train_added", train_added, choices=(True, False))
        self.fusion_weights = self._weights(fusion_weights)
        dims, classes = head_sizes(model, self.modalities, feature_dims, num_classes, self.name)
        self.classifiers = BoostedClassifiers(dims, classes, self.hidden_dim, self.max_classifiers, self.seed)
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        if ref is not None:
            self.classifiers.to(ref.device, ref.dtype)
        self.add_state("classifiers", self.classifiers)
        self.add_state("active_counts", {m: 0 for m in self.modalities})  # added classifiers in use
        self.add_state("weak", None)  # the modality the last check chose (None: none)
        self.add_state("scored_epoch", None)  # the epoch whose confidences `score` sums
        self.add_state("score", torch.zeros(len(self.modalities), dtype=torch.float32))
        self.add_state("seen", torch.zeros((), dtype=torch.float32))
        self.add_stat("step_score", torch.zeros(len(self.modalities), dtype=torch.float32))
        self.add_stat("step_seen", torch.zeros((), dtype=torch.float32))
        self._sync_trainable()

    def _weights(self, weights: Sequence[float] | None) -> list[float]:
        n = len(self.modalities)
        values = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(values) != n or min(values) < 0 or sum(values) <= 0:
            raise ValueError(
                f"Balancer 'aug' option fusion_weights must be {n} non-negative numbers (one per modality "
                f"{self.modalities}) with a positive sum, found {weights!r}."
            )
        return [w / sum(values) for w in values]

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every classifier's parameters, the inactive slots included (the optimizer holds them from the start)."""
        return self.classifiers.parameters()

    def _sync_trainable(self) -> None:
        """Active added slots are trainable with ``train_added``; inactive ones never. Also rebuilds the
        logged figures (active counts, weak modality) as tensors on the classifiers' device."""
        for m in self.modalities:
            for k, layer in enumerate(self.classifiers.added[m]):
                layer.requires_grad_(self.train_added and k < self.active_counts[m])
        device = self.classifiers.out.weight.device
        counts = [float(self.active_counts[m]) for m in self.modalities]
        weak = [float(m == self.weak) for m in self.modalities]
        self._figures = (torch.tensor(counts, device=device), torch.tensor(weak, device=device))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state and which slots train."""
        super().load_state_dict(state)
        self._sync_trainable()

    # ------------------------------------------------------------------ training
    def _feature(self, out: MultimodalOutput, m: str) -> Tensor:
        z = output_features(out, "Balancer 'aug' classifies each modality from its encoder features")[m]
        layer = self.classifiers.base[m]
        if z.dim() != 2 or z.shape[1] != layer.in_features:
            raise ValueError(
                f"Balancer 'aug': the classifiers of {m!r} expect features of shape (B, {layer.in_features}), "
                f"found {tuple(z.shape)}. Pass feature_dims={{{m!r}: <size>}} matching out.features[{m!r}]."
            )
        if layer.weight.device != z.device:
            self.classifiers.to(z.device)
        if z.dtype != layer.weight.dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(layer.weight.dtype)
        return z

    def ensemble(self, out: MultimodalOutput, m: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Modality ``m``'s ``(f_m, o_m, a_m)`` with its active added classifiers."""
        return self.classifiers.parts(m, self._feature(out, m), self.active_counts[m])

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """``sum_m L_m`` (see the class docstring); sums each modality's true-class confidence for the check."""
        losses, residuals, confidence = [], [], []
        for m in self.modalities:
            f, prev, newest = self.ensemble(out, m)
            loss, res = boosting_loss(f, prev, newest, target, self.residual_weight)
            losses.append(loss)
            residuals.append(res.float())
            confidence.append(torch.softmax(f.detach().float(), -1).gather(1, target[:, None]).sum())
        conf = torch.stack(confidence)
        self.step_score = self.step_score + conf.to(self.step_score)
        self.step_seen = self.step_seen + target.shape[0]
        counts, weak = self._figures
        self.record("classifiers", counts.to(conf.device))  # built at each change: no copy per step
        self.record("weak", weak.to(conf.device))
        self.record("residual_loss", torch.stack(residuals))
        self.record("confidence", conf / target.shape[0])
        return torch.stack(losses).sum()

    def adjust_gradients(self) -> None:
        """Add this step's confidences (already summed over ranks) to the epoch's."""
        self.score = self.score + self.step_score
        self.seen = self.seen + self.step_seen

    # ------------------------------------------------------------------ the classifier assignment
    def set_epoch(self, epoch: int) -> None:
        """Start an epoch: after a check epoch, add a classifier to the weak modality."""
        super().set_epoch(epoch)
        if self.scored_epoch == epoch:  # the same epoch again (a resumed run): nothing to do
            return
        if self.scored_epoch is not None and self._is_check(self.scored_epoch):
            self._assign(self.scored_epoch)
        self.scored_epoch = epoch
        self.score = torch.zeros_like(self.score)
        self.seen = torch.zeros_like(self.seen)

    def _is_check(self, epoch: int) -> bool:
        return epoch == self.first_epoch or (epoch + 1) % self.check_every == 0

    def _assign(self, epoch: int) -> None:
        """The check after ``epoch`` (host reads: once per check)."""
        if float(self.seen) <= 0:  # the epoch trained nothing inside the window
            return
        scores = self.score.detach().cpu()
        weak = weakest_modality(scores, self.tolerance)
        self.weak = None if weak is None else self.modalities[weak]
        added = self.weak is not None and self.active_counts[self.weak] < self.max_classifiers
        if added:
            self.active_counts = {**self.active_counts, self.weak: self.active_counts[self.weak] + 1}
        self._sync_trainable()
        log.info(
            "aug: after epoch %d confidences %s, weak %s, %s; added classifiers %s",
            epoch,
            dict(zip(self.modalities, (scores / float(self.seen)).tolist(), strict=True)),
            self.weak,
            "one added" if added else "none added",
            self.active_counts,
        )

    # ------------------------------------------------------------------ evaluation
    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's ensemble ``f_m``."""
        return {m: self.ensemble(out, m)[0] for m in self.modalities}

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """``sum_m w_m f_m``."""
        uni = self.unimodal_prediction(out)
        return sum(w * uni[m] for w, m in zip(self.fusion_weights, self.modalities, strict=True))
