"""Separate unimodal heads owned by a balancer: one linear classifier per modality on its encoder features.

MMPareto's and G-Blending's reference code give every modality a linear head of its own besides the
fused one (MMPareto ``head_audio``/``head_video``; MultiBench ``unimodal_classification_heads``). Taking
the unimodal logits from the fused head instead (its concat column blocks, or the sum heads) ties the
unimodal and fused gradients together, and the models users write often cannot be split at all (FiLM,
gated, attention fusions, whose unimodal logits come from auxiliary heads on detached features).
:class:`UnimodalHeads` is that head set, owned by the balancer rather than the model: its parameters are
the balancer's :meth:`~equimodal.Balancer.parameters` (the optimizer must hold them), it reads the
model's ``out.features`` (not detached, so each unimodal loss reaches its encoder), and it lives outside
the user's DDP wrapper, so the base class averages its gradients over ranks and checks that the optimizer
steps it, as for every balancer's own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features

HeadsMode = Literal["separate", "shared"]
HEADS_MODES: tuple[str, ...] = ("separate", "shared")
SHARED_OK = ("mmpareto", "gblending")  # the balancers with a heads="shared" option


def require_encoder_unimodal_logits(model: nn.Module, method: str) -> None:
    """Raise when the model's unimodal logits cannot carry gradient to the encoders.

    Fusions that cannot be split (FiLM, gated, attention) compute unimodal logits with auxiliary
    heads on *detached* features, so a unimodal loss taken from them never reaches its encoder.
    """
    if getattr(model, "auxiliary_heads", False):
        fusion = type(getattr(model, "fusion", model)).__name__
        raise ValueError(
            f"{method} with heads='shared' trains the encoders through the model's unimodal logits, but this "
            f"model's fusion ({fusion}) computes them with auxiliary heads on detached features "
            "(model.auxiliary_heads is True). Use heads='separate' (the default: heads of the balancer's own "
            "on the encoder features) or a splittable fusion: fusion='concat', 'sum' or 'weighted'."
        )


def check_heads_mode(heads: str, model: nn.Module, method: str) -> bool:
    """Validate the ``heads`` option; returns whether the heads are separate (shared heads need a
    splittable fusion, see :func:`require_encoder_unimodal_logits`)."""
    if heads not in HEADS_MODES:
        raise ValueError(f"heads must be one of {HEADS_MODES}, found {heads!r}.")
    if heads == "shared":
        require_encoder_unimodal_logits(model, method)
    return heads == "separate"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def head_sizes(
    model: nn.Module,
    modalities: list[str],
    feature_dims: Mapping[str, int] | None,
    num_classes: int | None,
    method: str,
) -> tuple[dict[str, int], int]:
    """Each modality's feature size and the number of classes, for building one head per modality.

    Feature sizes come from ``feature_dims`` when given, else from each encoder's ``out_dim``, else from
    the fusion's ``dims`` (a ``MultimodalClassifier`` built with ``feature_dims=``); the number of classes
    from ``num_classes``, else ``model.num_classes`` or ``model.fusion.num_classes``. ``feature_dims``
    holds one size per modality (each head is sized to its own encoder); MLA's ``feature_dim`` is a
    different option, the single input size of its one shared head.

    Raises:
        ValueError: a size is found nowhere (naming the balancer, the attributes read and the option).
    """
    given = dict(feature_dims or {})
    unknown = sorted(set(given) - set(modalities))
    if unknown:
        raise ValueError(f"feature_dims names unknown modalities {unknown}; the modalities are {modalities}.")
    fusion = getattr(model, "fusion", None)
    fusion_dims = getattr(fusion, "dims", None) or {}
    dims: dict[str, Any] = {
        m: given.get(m) or getattr(model.encoders[m], "out_dim", None) or fusion_dims.get(m)
        for m in modalities
    }
    bad = {m: d for m, d in dims.items() if not _positive_int(d)}
    if bad:
        example = ", ".join(f"{m!r}: <size>" for m in bad)
        looked = ", ".join(f"model.encoders[{m!r}].out_dim" for m in bad)
        raise ValueError(
            f"Balancer {method!r} builds a linear head per modality on its encoder features and needs each "
            f"feature size; it looked for {looked} (and model.fusion.dims) and found {bad}. Set `out_dim = "
            f"<size>` on those encoders, or pass feature_dims={{{example}}} (one size per modality; "
            "mla's feature_dim is another option, the one width of its shared head)"
            + (", or heads='shared' (the model's own unimodal logits)." if method in SHARED_OK else ".")
        )
    classes = num_classes or getattr(model, "num_classes", None) or getattr(fusion, "num_classes", None)
    if not (_positive_int(classes) and classes >= 2):
        raise ValueError(
            f"Balancer {method!r} builds a linear head per modality and needs the number of classes; it "
            f"looked for model.num_classes and model.fusion.num_classes and found {classes!r}. Set "
            "`model.num_classes = <int>` (2 or more) or pass num_classes=<int>."
        )
    return dims, classes


class UnimodalHeads:
    """One ``nn.Linear(d_m, C)`` per modality on ``out.features[m]``, owned by a balancer.

    Initialised as ``nn.Linear`` is (uniform in ``±1/sqrt(d_m)`` for weight and bias, the reference
    code's default), from a generator seeded with ``seed`` so that two balancers with the same seed, and
    every DDP rank, start from the same heads. Created on the device and dtype of the model's first
    parameter and moved, in place (the optimizer keeps its parameters), to the features' device when a
    batch arrives elsewhere (e.g. Lightning moves the model after the balancer is built).

    Args:
        model: the contract model (``model.encoders``).
        modalities: the modality names, in order.
        feature_dims: feature size per modality, for encoders without ``out_dim``.
        num_classes: number of classes, for models without ``num_classes``.
        seed: seed of the initialisation.
        method: the balancer's name, for error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        modalities: list[str],
        *,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        method: str = "This balancer",
    ) -> None:
        self.method = method
        dims, classes = head_sizes(model, modalities, feature_dims, num_classes, method)
        gen = torch.Generator().manual_seed(int(seed))
        linears = {}
        for m in modalities:
            linear = nn.Linear(dims[m], classes)
            bound = 1.0 / math.sqrt(dims[m])
            with torch.no_grad():
                linear.weight.copy_(torch.rand(classes, dims[m], generator=gen) * 2 * bound - bound)
                linear.bias.copy_(torch.rand(classes, generator=gen) * 2 * bound - bound)
            linears[m] = linear
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.linears = nn.ModuleDict(linears)
        if ref is not None:
            self.linears.to(ref.device, ref.dtype)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters (the optimizer must hold them)."""
        return self.linears.parameters()

    def logit(self, out: MultimodalOutput, m: str) -> Tensor:
        """Modality ``m``'s logits, ``head_m(out.features[m])``."""
        needs = f"{self.method} with heads='separate' classifies each modality from its encoder features"
        z = output_features(out, needs, ", or use heads='shared' (the model's own unimodal logits)")[m]
        head = self.linears[m]
        if z.dim() != 2 or z.shape[1] != head.in_features:
            raise ValueError(
                f"{self.method}: the head of {m!r} expects features of shape (B, {head.in_features}), found "
                f"{tuple(z.shape)}. Pass feature_dims={{{m!r}: <size>}} matching out.features[{m!r}] (pooled)."
            )
        if head.weight.device != z.device:
            head.to(z.device)
        if z.dtype != head.weight.dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(head.weight.dtype)
        return head(z)

    def logits(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Every modality's logits through its own head."""
        return {m: self.logit(out, m) for m in self.linears}

    def state_dict(self) -> dict[str, Tensor]:
        """The heads' weights (``"<modality>.weight"``, ``"<modality>.bias"``)."""
        return {k: v.detach().clone() for k, v in self.linears.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load weights in place, so the optimizer keeps holding the same parameters."""
        self.linears.load_state_dict(dict(state))


def build_heads(
    heads: str,
    model: nn.Module,
    modalities: Sequence[str],
    *,
    method: str,
    feature_dims: Mapping[str, int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> UnimodalHeads | None:
    """The ``heads`` option of MMPareto and G-Blending: separate heads of the balancer's own (built here),
    or ``None`` for ``"shared"`` (the model's unimodal logits; refused on auxiliary-head fusions)."""
    if not check_heads_mode(heads, model, method):
        return None
    return UnimodalHeads(
        model, modalities, feature_dims=feature_dims, num_classes=num_classes, seed=seed, method=method
    )


def own_heads(
    balancer: Any, model: nn.Module, *, feature_dims: Mapping[str, int] | None, num_classes: int | None
) -> UnimodalHeads:
    """Linear heads of ``balancer``'s own, one per modality, seeded by its ``seed`` and saved, averaged over
    ranks and checked in the optimizer as its state ``heads`` (``balancer.heads``)."""
    heads = UnimodalHeads(
        model,
        balancer.modalities,
        feature_dims=feature_dims,
        num_classes=num_classes,
        seed=balancer.seed,
        method=balancer.name,
    )
    balancer.heads = heads  # set first: a balancer may have declared ``self.heads = None`` before
    balancer.add_state("heads", heads)
    return heads
