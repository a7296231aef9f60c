"""DGL: disentangled gradient learning (Wei et al., "Boosting Multimodal Learning via Disentangled Gradient
Learning", ICCV 2025)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..models.fusion import ConcatFusion, SumFusion
from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch
from .heads import UnimodalHeads, own_heads
from .registry import register_balancer

DglHeads = Literal["shared", "separate"]
UnimodalBias = Literal["full", "share"]


@register_balancer("dgl")
class DGL(Balancer):
    """DGL (Wei et al., ICCV 2025): encoders learn from their unimodal losses only, the fusion from the fused loss only.

    Two stop-gradients split one step (official code: ``main_dgl.py`` ``train_epoch`` lines 100-129,
    ``models/fusion_modules.py`` ``ConcatFusion_DGL`` lines 45-59):

    ``L = CE(f(sg[z_1], ..., sg[z_M]), y) + alpha * sum_m CE(u_m(z_m; sg[theta_f]), y)``

    - the fused logits are the fusion head applied to *detached* features (``ConcatFusion_DGL.forward``
      line 54: ``output.detach()``), so the fused CE trains the fusion head only;
    - the unimodal logits ``u_m`` are the fusion head's own block for modality m (concat:
      ``fc_out([0, .., z_m, .., 0])``, lines 57-58; sum: the modality's own head, ``SumFusion_DGL``), and
      their CE reaches the encoders only: the authors backpropagate ``alpha (CE_a + CE_v)`` first and set
      every fusion-module gradient to ``None`` before backpropagating the fused CE (``main_dgl.py`` lines
      108-122). Here the head's parameters are detached in the unimodal pass instead, so one backward
      gives the same gradients (``tests/balancers/test_dgl.py`` re-enacts their two backward passes).

    Then the whole model's gradient norm is clipped to ``clip_norm`` (line 129), in ``before_step``.

    Defaults (the authors' runs): ``alpha=4`` (argparse default, ``main_dgl.py`` line 50, and the first
    CREMA-D command of ``cramed_dgl.sh``, 77.48 %; its second command, alpha 5, 78.12 %; Kinetics-Sounds
    2-3 in ``ks_dgl.sh``; the README asks to tune it); ``clip_norm=40`` (line 129; their ``main.py``
    clips the same way for the other methods, so it belongs to their recipe, but equimodal's trainer and
    a user's loop clip nothing, so it is applied here, where it reaches every driver; ``None`` turns it
    off); every epoch (``main_dgl.py`` reads no modulation window).

    Deviations, each an option whose default is the authors' behaviour:

    - ``unimodal_bias``: equimodal's concat head gives each modality ``b / M`` of the shared bias; the
      authors' ``fc_out([z_a, 0])`` carries the whole bias ``b``. ``"full"`` (default) adds the rest of
      ``b`` (detached) to the unimodal logits, in training and in :meth:`unimodal_prediction`, so the
      encoders' gradients are the authors'; ``"share"`` keeps equimodal's ``b / M``. Only concat heads
      share a bias; sum heads have a bias each, as ``SumFusion_DGL``.
    - ``heads``: the authors' unimodal logits share the fusion head (``"shared"``, the default where the
      fusion can be split per modality: concat, sum, weighted). FiLM, gated, attention and the other
      fusions that cannot be split (``model.auxiliary_heads``, or any fusion whose unimodal logits mix
      modalities, e.g. ``channel``) get ``"separate"``: a linear head per modality owned by the balancer
      (trained by the unimodal CE with its encoder; the fusion still learns from the fused CE on
      detached features). The authors' ``FiLM_DGL``/``GatedFusion_DGL`` instead feed each modality
      through the fusion with itself (``x x^T``, a self-gate), which is not defined for our fusions.
    - any M >= 2 (``alpha`` times the sum of the M unimodal CEs); the authors' code is two-modal.
    - no ``.item()`` per parameter and no CSV row per step: their logged figure, the sum over an
      encoder's parameters of the mean absolute gradient (lines 132-152), is recorded on the device.

    Cost: no extra backward pass (theirs: two); the fusion head runs twice more (on detached features,
    and with detached parameters), a linear layer for concat and sum (a model without ``model.fusion``:
    one backward through its head to the features instead). ``stats()``: ``uni_loss/<m>``,
    ``fused_loss``, ``grad_sum/<m>`` (the authors' per-step figure, after clipping), ``clip_scale`` (the
    clipping factor, 1 when it does not act; its epoch mean below 1 says how much and how often it acts).

    Args:
        model: a contract model with ``features`` in its output (the head's inputs, not detached). With
            its fusion head as ``model.fusion`` (``MultimodalClassifier``) the head runs again as above;
            otherwise the fused CE's gradient to the features is computed through the head (one small
            backward to the features only) and routed so that the gradients are the same.
        alpha: weight of the summed unimodal CEs.
        clip_norm: the total gradient norm is clipped to this in ``before_step``; ``None``: no clipping.
        unimodal_bias: ``"full"`` (the authors' concat unimodal logits) or ``"share"`` (``b / M``).
        heads: ``"shared"`` (the fusion head's blocks), ``"separate"`` (heads of the balancer's own), or
            ``None``: shared where the fusion can be split, separate otherwise.
        feature_dims, num_classes: sizes of the separate heads, for models that declare neither.
        start_epoch, end_epoch: the method's window; seed: the separate heads' initialisation.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 4.0,
        clip_norm: float | None = 40.0,
        unimodal_bias: UnimodalBias = "full",
        heads: DglHeads | None = None,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        alpha = self.check_option(
            "alpha", alpha, low=0, open_low=True, hint="the authors use 4 or 5 on CREMA-D"
        )
        clip_norm = self.check_option(
            "clip_norm",
            clip_norm,
            low=0,
            open_low=True,
            allow_none=True,
            hint="None: no clipping; the authors clip to 40",
        )
        unimodal_bias = self.check_option("unimodal_bias", unimodal_bias, choices=("full", "share"))
        heads = self.check_option(
            "heads",
            heads,
            choices=("shared", "separate"),
            allow_none=True,
            hint="None: shared where the fusion can be split",
        )
        fusion = getattr(model, "fusion", None)
        self.fusion: nn.Module | None = fusion if isinstance(fusion, nn.Module) else None
        aux = bool(getattr(model, "auxiliary_heads", False))
        # a model without `fusion`: its own unimodal logits are trusted to be per modality unless auxiliary
        splittable = not aux and (self.fusion is None or isinstance(self.fusion, (ConcatFusion, SumFusion)))
        if heads == "shared" and not splittable:
            raise ValueError(
                f"dgl with heads='shared' trains each encoder through its block of the fusion head, but the "
                f"fusion {type(fusion).__name__} cannot be split per modality. Use heads='separate' "
                "(or None) or fusion='concat', 'sum' or 'weighted'."
            )
        self.alpha, self.unimodal_bias = float(alpha), unimodal_bias
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.heads: UnimodalHeads | None = None
        if heads == "separate" or not splittable:
            self.heads = own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)
        # the concat head's bias, b / M of which each equimodal unimodal logit holds (None: nothing to add)
        full = self.heads is None and unimodal_bias == "full" and isinstance(self.fusion, ConcatFusion)
        self._shared_bias = self.fusion.fc.bias if full else None
        self._sizes: dict[str, Tensor] = {}  # each encoder's gradient sizes, for the mean |gradient|

    def parameters(self) -> Iterator[nn.Parameter]:
        """The separate heads' parameters (none with the fusion head's blocks)."""
        return iter(()) if self.heads is None else self.heads.parameters()

    def _features(self, out: MultimodalOutput) -> dict[str, Tensor]:
        features = output_features(out, "dgl runs the fusion head on the encoder features")
        return {m: features[m] for m in self.modalities}

    def _bias_rest(self) -> Tensor | float:
        """What the authors' concat unimodal logits hold beyond equimodal's ``b / M`` (detached)."""
        if self._shared_bias is None:
            return 0.0
        return self._shared_bias.detach() * (1.0 - 1.0 / len(self.modalities))

    def unimodal_logits(self, out: MultimodalOutput, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's logits for its encoder's loss, with no gradient to the fusion head."""
        if self.heads is not None:
            return self.heads.logits(out)
        frozen = {k: v.detach() for k, v in self.fusion.named_parameters()}
        frozen.update(dict(self.fusion.named_buffers()))
        _, uni = functional_call(self.fusion, frozen, (features,))
        rest = self._bias_rest()
        return {m: uni[m] + rest for m in self.modalities}

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """Fused CE on detached features (the fusion learns) + alpha * the unimodal CEs (the encoders learn)."""
        features = self._features(out)
        if self.fusion is None:
            return self._routed_objective(out, features, target)
        fused_logits, _ = self.fusion({m: z.detach() for m, z in features.items()})
        fused = F.cross_entropy(fused_logits, target)
        uni_logits = self.unimodal_logits(out, features)
        uni = torch.stack([F.cross_entropy(uni_logits[m], target) for m in self.modalities])
        self.record("uni_loss", uni)
        self.record("fused_loss", fused)
        return fused + self.alpha * uni.sum()

    def _routed_objective(self, out: MultimodalOutput, features: dict[str, Tensor], target: Tensor) -> Tensor:
        """The same gradients for a model whose head is not reachable as ``model.fusion``.

        The head cannot be run again on detached features, so the features' gradient is routed instead:
        ``D_m = d(alpha * sum_k CE(u_k) - CE(fused)) / d z_m`` through the model's head only (one small
        backward to the features, not to any parameter), and the loss ``CE(fused) + <D, z>`` (its value
        corrected to ``CE(fused) + alpha * sum CE(u)``) gives the head the fused CE's gradient and each
        encoder ``d CE(fused)/d z - d CE(fused)/d z + alpha d CE(u)/d z``. With separate heads their CE is
        a loss term of its own and ``D`` holds only the fused part.
        """
        fused = F.cross_entropy(out.logits, target)
        if self.heads is None:
            model_uni = torch.stack(
                [F.cross_entropy(out.unimodal_logits[m], target) for m in self.modalities]
            )
            own = torch.zeros((), device=fused.device)
            uni = model_uni
        else:
            model_uni = torch.zeros((), device=fused.device)
            uni = torch.stack([F.cross_entropy(self.heads.logit(out, m), target) for m in self.modalities])
            own = self.alpha * uni.sum()
        zs = [features[m] for m in self.modalities]
        if not all(z.requires_grad for z in zs):
            raise ValueError(
                "dgl routes the gradients through out.features, but they do not require grad (detached?). "
                "Return the encoder outputs the head consumed, not detached, as MultimodalOutput.features."
            )
        routed = torch.autograd.grad(
            self.alpha * model_uni.sum() - fused, zs, retain_graph=True, allow_unused=True
        )
        lin = sum(
            ((d * z).sum() for d, z in zip(routed, zs, strict=True) if d is not None), fused.new_zeros(())
        )
        self.record("uni_loss", uni)
        self.record("fused_loss", fused)
        return fused + own + lin - lin.detach() + self.alpha * model_uni.sum().detach()

    def adjust_gradients(self) -> None:
        """Clip the total gradient norm to ``clip_norm`` (the authors' line 129) and record their figure."""
        if self.clip_norm is not None:
            params = [*self.model.parameters(), *self.parameters()]
            grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
            if grads:  # clip_grad_norm_'s formula, decided on the device; 1 in a non-finite step
                total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                scale = torch.where(self.step_finite, (self.clip_norm / (total + 1e-6)).clamp(max=1.0), 1.0)
                torch._foreach_mul_(grads, scale)
                self.record("clip_scale", scale)
        self.record("grad_sum", torch.stack([self._grad_sum(m) for m in self.modalities]))

    def _grad_sum(self, modality: str) -> Tensor:
        """The authors' logged figure: the sum over an encoder's parameters of their mean absolute gradient."""
        grads = [p.grad for p in self.encoder_params(modality) if p.grad is not None and p.grad.numel()]
        if not grads:
            return torch.zeros((), device=self.device)
        l1 = torch.stack(torch._foreach_norm(grads, 1)).float()
        sizes = self._sizes.get(modality)
        if sizes is None or sizes.shape != l1.shape or sizes.device != l1.device:
            sizes = self._sizes[modality] = torch.tensor([float(g.numel()) for g in grads], device=l1.device)
        return (l1 / sizes).sum()

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """The logits the unimodal losses use (the authors' ``fc_out([z_a, 0])`` for concat)."""
        if self.heads is not None:
            return self.heads.logits(out)
        rest = self._bias_rest()
        return {m: out.unimodal_logits[m] + rest for m in self.modalities}
