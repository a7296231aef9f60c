"""MMCosine (Xu, Feng, Zhang & Hu, "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual
Fine-Grained Learning", ICASSP 2023): the fused logits are a scaled sum of per-modality cosines."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch
from .heads import head_sizes
from .registry import register_balancer

CosineHead = Literal["auto", "model", "own"]
COSINE_HEADS = ("auto", "model", "own")
Prediction = Literal["cosine", "model"]


def cosine_logits(features: Tensor, weight: Tensor, scaling: float) -> Tensor:
    """``s * cos(z_i, w_k)``, shape ``(B, C)``: L2-normalised features against L2-normalised class rows of
    ``weight`` (``(C, d)``), no bias."""
    return (F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()) * scaling


@register_balancer("mmcosine")
class MMCosine(Balancer):
    """MMCosine (Xu et al., ICASSP 2023): modality-wise L2 normalisation of features and class weights.

    While active, the training logits are ``o = sum_m o_m`` with ``o_m = s * cos(z_m, W_m)``: each
    modality's pooled feature ``z_m`` and each class row of its weight block ``W_m`` (``C x d_m``) are
    L2-normalised, there is no bias, and the loss is ``CE(o, y)``. Every modality's contribution to a logit
    lies in ``[-s, s]`` whatever its feature norm, so a modality cannot dominate the fused logits by
    growing its features (the imbalance the paper measures on CREMA-D, SSW60 and VoxCeleb).

    Official code (GeWu-Lab/MMCosine_ICASSP23 ``main_CD.py``): ``train_epoch`` (lines 113-118) builds
    ``out_a``/``out_v`` from ``F.normalize(a, dim=1)`` and ``F.normalize(fc_out.weight[:, :512].T, dim=0)``
    (the fusion head's column blocks), times ``args.scaling``, and trains ``CE(out_a + out_v)`` (line 141,
    plus ``lam`` times an NCE term, ``lam`` 0 by default).

    Where the weights come from (``head``): ``"model"`` uses the model's own fusion head, the weight block
    that ``model.fusion.modality_blocks()`` assigns to each modality (the concat head's column blocks, as
    the official code; the sum and weighted heads' own weights), so training moves the model's head and
    nothing is added. ``"own"`` gives the balancer a bias-free weight ``W_m`` per modality (its
    :meth:`parameters`, initialised as ``nn.Linear``, seeded), for fusions that cannot be split (FiLM,
    gated, attention), whose fused logits are not a sum of per-modality terms. ``"auto"`` (default) takes
    ``"model"`` where the fusion declares its blocks, else ``"own"``. Either way the model's own fused
    logits, and the fusion's bias, get no gradient while active (``requirements.unused_parameters``).

    Args:
        model: a contract model whose output carries ``features`` (pooled, not detached).
        scaling: ``s``. Default 10: the official argparse default and README command
            (``--scaling 10``); BalanceBenchmark's ``trainer_config.yaml`` uses 15.
        head: ``"auto"``, ``"model"`` or ``"own"`` (above).
        predict: evaluation logits while active: ``"cosine"`` (default, the cosine logits the method
            trains) or ``"model"`` (the model's own fused logits, which is what the official ``valid``
            reports as the fused accuracy, lines 185-191: it recomputes only the unimodal logits).
        feature_dims, num_classes: sizes for ``head="own"``, for models that declare neither.
        start_epoch, end_epoch: the method's window (default: always, as the official code); seed: the
            own weights' initialisation.

    Deviations from the official code: any ``M >= 2`` (each modality its own block); the NCE term of the
    supplementary material (``--lam``, 0 by default and in the README command) is not implemented. The
    released ``main_CD.py`` does not run as is: ``--dataset`` has ``defult=`` (argparse raises a
    ``TypeError``), and ``--mmcosine`` is ``type=bool``, so any value (``False`` too) turns it on; the
    README's ``--mmcosine True --scaling 10`` is what their runs used. With gated/FiLM fusion the official
    cosine reads the fusion's modulated features and ``fc_out``; here those fusions get ``head="own"`` on
    the encoder features. ``stats()``: ``cos/<m>`` (mean cosine with the true class), ``feature_norm/<m>``
    (mean norm of the features the cosine normalises away).
    """

    unused_parameters = True  # the fusion's bias (and its own fused path) get no gradient while active

    def __init__(
        self,
        model: nn.Module,
        *,
        scaling: float = 10.0,
        head: CosineHead = "auto",
        predict: Prediction = "cosine",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        scaling = self.check_option("scaling", scaling, low=0, open_low=True)
        head = self.check_option("head", head, choices=COSINE_HEADS)
        predict = self.check_option("predict", predict, choices=("cosine", "model"))
        self.scaling, self.predict_with = scaling, predict
        blocks = self._model_blocks(model)
        if head == "model" and blocks is None:
            fusion = type(getattr(model, "fusion", model)).__name__
            raise ValueError(
                f"Balancer 'mmcosine' with head='model' needs a fusion head split into per-modality weight blocks "
                f"(model.fusion.modality_blocks(): concat, sum, weighted); this model's fusion ({fusion}) has "
                "none. Use head='own' (a cosine head of the balancer's own) or head='auto'."
            )
        self.head = "model" if head != "own" and blocks is not None else "own"
        self.blocks = blocks if self.head == "model" else None
        self.weights = nn.ParameterDict()
        if self.head == "own":
            self._build_own(model, feature_dims, num_classes)
            self.add_state("weights", self.weights)

    def _model_blocks(self, model: nn.Module) -> dict[str, tuple[nn.Parameter, slice]] | None:
        """Each modality's (weight, column slice) of the model's fusion head, or ``None`` if it has none."""
        fusion = getattr(model, "fusion", None)
        get = getattr(fusion, "modality_blocks", None)
        blocks = get() if callable(get) else {}
        if getattr(model, "auxiliary_heads", False) or set(blocks) != set(self.modalities):
            return None
        return dict(blocks)

    def _build_own(self, model: nn.Module, dims: Mapping[str, int] | None, classes: int | None) -> None:
        sizes, c = head_sizes(model, self.modalities, dims, classes, self.name)
        gen = torch.Generator().manual_seed(self.seed)
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        for m in self.modalities:
            bound = 1.0 / math.sqrt(sizes[m])
            w = torch.rand(c, sizes[m], generator=gen) * 2 * bound - bound
            if ref is not None:
                w = w.to(ref.device, ref.dtype)
            self.weights[m] = nn.Parameter(w)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The own cosine weights with ``head="own"`` (put them in the optimizer); none with ``"model"``."""
        return iter(self.weights.values())

    def weight(self, m: str, like: Tensor) -> Tensor:
        """Modality ``m``'s ``(C, d_m)`` class weights (the model's block, or the balancer's own)."""
        if self.blocks is not None:
            w, cols = self.blocks[m]
            w = w[:, cols]
        else:
            w = self.weights[m]
            if w.device != like.device:
                self.weights.to(like.device)
                w = self.weights[m]
        if w.shape[1] != like.shape[-1]:
            raise ValueError(
                f"mmcosine: the weights of {m!r} have {w.shape[1]} columns but out.features[{m!r}] has shape "
                f"{tuple(like.shape)}; the fusion's input must be the pooled encoder feature (use head='own')."
            )
        return w

    def cosine(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's scaled cosine logits ``s * cos(z_m, W_m)``."""
        features = output_features(out, "mmcosine normalises each modality's features")
        logits = {}
        for m in self.modalities:
            z = features[m]
            w = self.weight(m, z)
            logits[m] = cosine_logits(z.to(w.dtype), w, self.scaling)
        return logits

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """CE of the summed cosine logits."""
        uni = self.cosine(out)
        fused = torch.stack(list(uni.values())).sum(0)
        true = torch.stack([uni[m].detach().gather(1, target[:, None]).mean() for m in self.modalities])
        norms = torch.stack([out.features[m].detach().float().norm(dim=1).mean() for m in self.modalities])
        self.record("cos", true / self.scaling)
        self.record("feature_norm", norms)
        return F.cross_entropy(fused, target)

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """The summed cosine logits (``predict="cosine"``) or the model's fused logits (``"model"``)."""
        if self.predict_with == "model":
            return out.logits
        return torch.stack(list(self.cosine(out).values())).sum(0)

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's cosine logits (as the official ``valid`` computes them)."""
        return self.cosine(out)
