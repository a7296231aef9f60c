"""LFM: learning the modality gap (Yang et al., "Facilitating Multimodal Classification via Dynamically
Learning Modality Gap", NeurIPS 2024)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_mean
from ..types import MultimodalOutput
from .agm import eval_mode, head_blocks
from .base import Balancer, Batch, EpochData, Requirements
from .heads import HEADS_MODES, UnimodalHeads, own_heads
from .registry import register_balancer

# The authors' fit of the learned weights over their 200 CREMA-D epochs (``Crema_epoch.py`` lines 49-50,
# ``getAlpha_Learnable_Fitted``): coefficients of epoch**0 .. epoch**5 of the CE weight a1; a2 = 1 - a1.
HEURISTIC_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08,
                          -5.39717505e-11)  # fmt: skip
HEURISTIC_EPOCHS = 200  # the epochs the fit covers (``data/crema.json`` "epoch_dict": 200)
Weighting = Literal["heuristic", "learnable"]
Divergence = Literal["js", "official"]


def heuristic_weights(epoch: int) -> tuple[float, float]:
    """``(a1, a2)`` of the authors' quintic fit at ``epoch`` (held at epoch 199 past the fitted 200)."""
    e = min(max(int(epoch), 0), HEURISTIC_EPOCHS - 1)
    a1 = sum(c * e**i for i, c in enumerate(HEURISTIC_COEFFICIENTS))
    return a1, 1.0 - a1


def alignment_divergence(logits: Sequence[Tensor], form: Divergence = "js") -> Tensor:
    """The divergence between the modalities' softmaxes, summed over classes and averaged over the batch.

    With ``p_m = softmax(o_m)`` and their mixture ``pbar = mean_m p_m``: ``"js"`` is the generalised
    Jensen-Shannon divergence with uniform weights, ``mean_m KL(p_m || pbar)`` (for two modalities the JS
    divergence); ``"official"`` is ``mean_m KL(pbar || p_m)``, which the authors' ``Alignment`` computes
    (``F.kl_div(p.log(), m)`` is ``KL(m || p)``). Computed in float32 from log-softmaxes.
    """
    logp = torch.stack([F.log_softmax(o.float(), dim=-1) for o in logits])  # (M, B, C)
    log_mix = torch.logsumexp(logp, dim=0) - math.log(len(logits))
    if form == "js":
        kl = (logp.exp() * (logp - log_mix)).sum(-1)
    else:
        mix = log_mix.exp()
        kl = (torch.xlogy(mix, mix) - mix * logp).sum(-1)
    return kl.mean()


@register_balancer("lfm")
class LFM(Balancer):
    """LFM (Yang et al., NeurIPS'24): CE of the mean unimodal logits plus a weighted alignment divergence.

    The loss is ``L = 2 [a1 CE(o, y) + a2 D(p_1, ..., p_M)]`` with ``o = mean_m o_m`` the mean of the
    unimodal logits, ``p_m = softmax(o_m)`` and ``D`` the Jensen-Shannon divergence between the unimodal
    softmaxes (:func:`alignment_divergence`; for ``M > 2`` the generalised JS divergence against the
    mixture of all M). ``a2`` sets how much the modalities' predictions are pulled together (the
    "modality gap" the paper learns), ``a1 = 1 - a2``. The factor 2 and ``o = (o_a + o_v) / 2`` are the
    official code's (``Crema_epoch.py`` ``train_audio_video`` lines 69-71). :meth:`predict` returns ``o``,
    as their ``val`` scores ``0.5 o_v + 0.5 o_a`` (line 114).

    Two weightings:

    - ``"heuristic"`` (default; ``Crema_epoch.py``, the script the README runs): ``a1`` is the
      authors' quintic fit in the epoch of their learned weights on CREMA-D (lines 47-53,
      :data:`HEURISTIC_COEFFICIENTS`), from about 0.20 at epoch 0 to about 0.90 at epoch 160 (``a2``
      dips slightly below 0 near epoch 180, as they ran it). The epoch counts from the window's
      start; past their 200 epochs it is held at the epoch-199 value (the fit grows without bound).
    - ``"learnable"`` (``Crema_epoch_learnable.py`` ``getAlpha_Learnable``, lines 55-97, called before each
      epoch, line 254): from ``a2 = 0.95`` (line 250), at each epoch start, on ``heldout_samples`` (8)
      fixed held-out training samples, with ``L = a1 CE + a2 D`` (no factor 2 there), the gradients
      ``g = dL/dtheta`` and ``g_ce = dCE/dtheta`` and the Hessian-vector product ``h = (dg/dtheta) g_ce``;
      ``a2 <- clip(a2 - lr * mean(h_0), 0.05, 0.95)`` with ``h_0`` the product's first parameter tensor
      (line 87), ``lr = 1e-4`` halved at every 20th epoch (lines 90-91, 246).

    Which logits. ``heads=None`` (default) takes the model's unimodal logits where they reach the
    encoders (concat, sum, weighted, channel fusions: per-modality linear maps of each feature, as the
    authors' ``cls_a``/``cls_v``, ``model/AudioVideo.py`` lines 54-65) and separate linear heads of the
    balancer's own on ``out.features`` for fusions whose unimodal logits come from auxiliary heads on
    detached features (FiLM, gated, attention); ``"shared"``/``"separate"`` force one. Separate heads are
    :meth:`parameters` (in the optimizer); the model's fused head is then not trained by this loss.

    Args:
        model: a contract model (with ``features`` in its output for separate heads).
        weighting: ``"heuristic"`` (default) or ``"learnable"``.
        divergence: ``"js"`` (default: the JS divergence the paper and the code's names describe) or
            ``"official"`` (the code's ``mean_m KL(pbar || p_m)``, an argument-order slip in ``F.kl_div``).
        alpha_init: initial ``a2`` of the learnable weighting (0.95, line 250).
        alpha_lr: step of the learnable ``a2`` (1e-4, line 246).
        alpha_halving: epochs between halvings of ``alpha_lr`` (20, line 90).
        alpha_bounds: the clip of ``a2`` (0.05, 0.95; line 93).
        heldout_samples: held-out samples of the hypergradient (8: the first half of their 16, lines 59-62).
        heldout_fraction: share of train held out in the learnable mode (0.0025: about their 16 of
            CREMA-D's 6,698 training clips, ``Crema_epoch_learnable.py`` lines 216-222; at least one
            sample per class with the reference trainer). The heuristic mode holds nothing out.
        hypergrad_params: ``"first"`` (default, line 87: the first trainable model parameter, the
            audio encoder's first convolution in theirs) or ``"all"`` (the mean over every parameter).
        heads: ``None`` (see above), ``"shared"`` or ``"separate"``.
        feature_dims, num_classes: sizes of separate heads for models that do not declare them.
        start_epoch, end_epoch, seed: the window (default: always) and the separate heads' seed.

    The paper's abstract speaks of integrating an unsupervised contrastive loss with the supervised one;
    the released code's second term is this divergence between the unimodal predictions, which is what
    is implemented here (no contrastive variant).

    Deviations from the official code: the true JS divergence by default (``divergence="official"`` gives
    theirs); any ``M >= 2`` (the generalised JS; theirs is audio-visual); the hypergradient runs in eval
    mode (theirs runs in train mode at epoch 0, when the fresh model was never put in eval, and in eval
    mode after, once ``val`` has set it) and is averaged over DDP ranks; a non-finite hypergradient leaves
    ``a2`` unchanged; the heuristic weights are held past epoch 199. The held-out samples are the first
    ``heldout_samples`` of ``EpochData.heldout`` at each epoch start (fixed when that loader is not
    shuffled, as the reference trainer's is not).

    Cost: none in a step beyond the divergence; the learnable mode adds, once per epoch, one forward
    and a double backward (a Hessian-vector product) on 8 samples. ``stats()``: ``alpha_ce``,
    ``alpha_align`` (a1, a2), ``ce``, ``divergence``, ``align_share`` (the alignment term's share of the
    loss, how much the method acts) every step, and ``alpha_grad`` (the last hypergradient; learnable).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weighting: Weighting = "heuristic",
        divergence: Divergence = "js",
        alpha_init: float = 0.95,
        alpha_lr: float = 1e-4,
        alpha_halving: int = 20,
        alpha_bounds: tuple[float, float] = (0.05, 0.95),
        heldout_samples: int = 8,
        heldout_fraction: float = 0.0025,
        hypergrad_params: Literal["first", "all"] = "first",
        heads: Literal["shared", "separate"] | None = None,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        weighting = self.check_option("weighting", weighting, choices=("heuristic", "learnable"))
        divergence = self.check_option("divergence", divergence, choices=("js", "official"))
        hypergrad_params = self.check_option("hypergrad_params", hypergrad_params, choices=("first", "all"))
        heads = self.check_option("heads", heads, choices=HEADS_MODES, allow_none=True)
        low, high = self._check_numbers(alpha_bounds, alpha_init, alpha_lr, heldout_fraction)
        alpha_halving = self.check_option("alpha_halving", alpha_halving, low=1, integer=True)
        heldout_samples = self.check_option("heldout_samples", heldout_samples, low=1, integer=True)
        self.weighting, self.divergence, self.hypergrad_params = weighting, divergence, hypergrad_params
        self.alpha_lr, self.alpha_halving, self.alpha_bounds = float(alpha_lr), alpha_halving, (low, high)
        self.heldout_samples = heldout_samples
        self.heldout_fraction = float(heldout_fraction) if weighting == "learnable" else 0.0
        aux = bool(getattr(model, "auxiliary_heads", False))
        if heads == "shared" and aux:
            raise ValueError(
                f"lfm with heads='shared' trains the encoders through the model's unimodal logits, but this "
                f"model's fusion ({type(getattr(model, 'fusion', model)).__name__}) computes them with "
                "auxiliary heads on detached features. Use heads='separate' or heads=None (the default)."
            )
        self.heads_mode = heads or ("separate" if aux else "shared")
        self.heads: UnimodalHeads | None = None
        if self.heads_mode == "separate":
            self.heads = own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)
        self.unused_parameters = self._leaves_parameters_unused(model)
        if weighting == "learnable":
            self.add_state("alpha_align", torch.tensor(float(alpha_init)))  # a2; a1 = 1 - a2
            self.add_state("alpha_grad", torch.zeros(()))  # the last hypergradient, for logging
        self._cache: tuple[int, torch.device, Tensor] | None = None  # heuristic (a1, a2) on the device

    def _check_numbers(
        self, bounds: Sequence[float], init: float, lr: float, fraction: float
    ) -> tuple[float, float]:
        pair = isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 2
        numbers = pair and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        if not (numbers and 0 <= bounds[0] <= bounds[1] <= 1):
            raise ValueError(
                f"Balancer {self.name!r} option 'alpha_bounds' must be (low, high) with 0 <= low <= high <= 1, "
                f"found {bounds!r}."
            )
        low, high = float(bounds[0]), float(bounds[1])
        self.check_option("alpha_init", init, low=low, high=high, hint="inside alpha_bounds")
        self.check_option("alpha_lr", lr, low=0, hint="the authors use 1e-4")
        self.check_option("heldout_fraction", fraction, low=0, high=1, open_low=True, open_high=True)
        return low, high

    def _leaves_parameters_unused(self, model: nn.Module) -> bool:
        """Whether some fusion parameter gets no gradient from this loss (DDP's find_unused_parameters)."""
        fusion = getattr(model, "fusion", None)
        if not isinstance(fusion, nn.Module):
            return False
        if self.heads is not None:
            return any(p.requires_grad for p in fusion.parameters())
        blocks, biases = head_blocks(model, self.modalities)
        used = {id(w) for ws in blocks.values() for w, _ in ws} | {id(b) for b, _ in biases}
        return any(p.requires_grad and id(p) not in used for p in fusion.parameters())

    # ------------------------------------------------------------------ what a driver must do
    @property
    def uses_epoch_data(self) -> bool:
        """Only the learnable weighting works at epoch starts (its hypergradient step)."""
        return self.weighting == "learnable"

    @property
    def requirements(self) -> Requirements:
        """As derived by the base class; both weightings follow the epoch, so ``set_epoch`` is needed."""
        return dataclasses.replace(super().requirements, set_epoch=True)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The separate heads' parameters (none when the model's unimodal logits are used)."""
        return self.heads.parameters() if self.heads is not None else iter(())

    # ------------------------------------------------------------------ the loss
    def _logits(self, out: MultimodalOutput) -> dict[str, Tensor]:
        return self.heads.logits(out) if self.heads is not None else dict(out.unimodal_logits)

    def _mean_logits(self, logits: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([logits[m] for m in self.modalities]).mean(0)

    def weights(self) -> Tensor:
        """``(a1, a2)`` of the current epoch as a device tensor (no host read)."""
        if self.weighting == "learnable":
            return torch.stack([1 - self.alpha_align, self.alpha_align])
        epoch, device = self.epoch - self.first_epoch, self.device
        if self._cache is None or self._cache[:2] != (epoch, device):  # once per epoch
            self._cache = (epoch, device, torch.tensor(heuristic_weights(epoch), device=device))
        return self._cache[2]

    def _terms(self, out: MultimodalOutput, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = self._logits(out)
        ce = F.cross_entropy(self._mean_logits(logits), target)
        return ce, alignment_divergence([logits[m] for m in self.modalities], self.divergence)

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """``2 [a1 CE(mean_m o_m) + a2 D(softmax o_1, ..., softmax o_M)]``."""
        ce, div = self._terms(out, target)
        a = self.weights()
        cls_term, align_term = a[0] * ce, a[1] * div
        self.record("alpha_ce", a[0])
        self.record("alpha_align", a[1])
        self.record("ce", ce)
        self.record("divergence", div)
        self.record(
            "align_share", align_term.detach() / (cls_term + align_term).detach().abs().clamp_min(1e-12)
        )
        if self.weighting == "learnable":
            self.record("alpha_grad", self.alpha_grad)
        return 2 * (cls_term + align_term)

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """The mean of the unimodal logits the method trains (argmax as the fused logits' for concat/sum)."""
        return self._mean_logits(self._logits(out))

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """The unimodal logits the method trains (the separate heads' when it has them)."""
        return self._logits(out)

    # ------------------------------------------------------------------ the learnable weighting
    def _heldout_batch(self, data: EpochData) -> tuple[dict[str, Tensor], Tensor]:
        """The first ``heldout_samples`` samples of the held-out split, as one batch."""
        parts: list[tuple[Mapping[str, Any], Tensor]] = []
        count = 0
        for inputs, labels in data.batches("heldout"):
            parts.append((inputs, labels))
            count += labels.shape[0]
            if count >= self.heldout_samples:
                break
        if count == 0:
            raise ValueError(
                "lfm weighting='learnable' got an empty held-out split: EpochData.heldout yielded none."
            )
        n = self.heldout_samples
        keys = [k for k, v in parts[0][0].items() if isinstance(v, Tensor)]
        batch = {k: torch.cat([p[0][k] for p in parts])[:n] for k in keys}
        return batch, torch.cat([p[1] for p in parts])[:n]

    def hypergradient(self, batch: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """``mean(h)`` with ``h = (d/dtheta dL/dtheta) dCE/dtheta`` over the first (or every) parameter tensor,
        ``L = a1 CE + a2 D`` at the current weights, on ``batch`` (the model's mode is the caller's)."""
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.parameters())
        ce, div = self._terms(self.model(batch), target)
        a = self.weights().detach()
        grads = torch.autograd.grad(a[0] * ce + a[1] * div, params, create_graph=True, allow_unused=True)
        ce_grads = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        pairs = [
            (g, torch.zeros_like(p) if c is None else c)
            for g, c, p in zip(grads, ce_grads, params, strict=True)
            if g is not None and g.requires_grad
        ]
        hvp = torch.autograd.grad([g for g, _ in pairs], params, [c for _, c in pairs], allow_unused=True)
        hvp = [torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params, strict=True)]
        if self.hypergrad_params == "first":
            return hvp[0].mean()
        return torch.cat([h.reshape(-1) for h in hvp]).mean()

    def on_epoch_start(self, data: EpochData) -> None:
        """Learnable weighting: one clipped hypergradient step of ``a2`` on the held-out samples."""
        if data.heldout is None:  # prepare_epoch checks it unless heldout_fraction was set to 0
            raise ValueError(
                "lfm weighting='learnable' needs EpochData.heldout (a part of train); found None."
            )
        batch, target = self._heldout_batch(data)
        with eval_mode(self.model):
            grad = all_reduce_mean(self.hypergradient(batch, target).detach().float())
        lr = self.alpha_lr * 0.5 ** ((self.epoch - self.first_epoch) // self.alpha_halving)
        low, high = self.alpha_bounds
        a2 = self.alpha_align
        stepped = (a2 - lr * grad.to(a2)).clamp(low, high)
        self.alpha_align = torch.where(torch.isfinite(grad), stepped, a2)
        self.alpha_grad = grad.to(a2)
