"""Fusion heads that return fused logits and *exact* per-modality (unimodal) logits.

Every fusion maps ``features: dict[str, Tensor]`` (pooled ``(B, d_m)`` per modality, in modality
order) to ``(fused_logits, unimodal_logits)``.

- ``concat``: ``z = W[h_1; ...; h_M] + b`` and ``z_m = W[:, block_m] h_m + b / M``; the unimodal
  logits sum exactly to the fused logits.
- ``sum``: each modality has its own linear head, ``z = sum_m z_m``.
- ``weighted``: own heads, ``z = sum_m w_m z_m`` with ``w = M * softmax(alpha)`` learnable.
- ``film``, ``gated``, ``attention``: cannot be split into per-modality terms, so they carry
  auxiliary per-modality linear heads on *detached* features (``auxiliary = True``); the base
  balancer trains those heads with their own CE, which never reaches the encoders or the fusion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import Registry

FusionOutput = tuple[Tensor, dict[str, Tensor]]


class Fusion(nn.Module):
    """Base class of fusion heads.

    Args:
        dims: feature dimension of each modality, in modality order.
        num_classes: number of classes C.
    """

    auxiliary: ClassVar[bool] = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"A fusion needs at least 2 modalities, found {list(dims)}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, found {num_classes}.")
        self.dims = dict(dims)
        self.modalities = list(dims)
        self.num_classes = int(num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        """Per modality, a weight of the head and the column slice that belongs to it (may be empty)."""
        return {}


FUSIONS: Registry[type[Fusion]] = Registry(
    "fusion", base=Fusion, skip=2, example="create_fusion({name!r}, dims, num_classes, {key}=...)"
)


def register_fusion(name: str, *, overwrite: bool = False) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator registering a :class:`Fusion` subclass under ``name`` (it also sets ``cls.name``)."""
    return FUSIONS.decorator(name, overwrite=overwrite)


class _AuxHeads(Fusion):
    """Mixin state: one auxiliary linear head per modality on detached features."""

    auxiliary = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.aux = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def aux_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.aux[m](features[m].detach()) for m in self.modalities}


@register_fusion("concat")
class ConcatFusion(Fusion):
    """Concatenate features and apply one linear layer; unimodal logits use each column block."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)
        bounds, start = {}, 0
        for m, d in dims.items():
            bounds[m] = slice(start, start + d)
            start += d
        self._blocks = bounds

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        w, b = self.fc.weight, self.fc.bias
        share = b / len(self.modalities)
        uni = {m: features[m] @ w[:, self._blocks[m]].t() + share for m in self.modalities}
        fused = torch.stack(list(uni.values())).sum(0)
        return fused, uni

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        return {m: (self.fc.weight, s) for m, s in self._blocks.items()}


@register_fusion("sum")
class SumFusion(Fusion):
    """Each modality has its own linear head; fused logits are their sum."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.heads[m](features[m]) for m in self.modalities}
        return torch.stack(list(uni.values())).sum(0), uni

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        return {m: (h.weight, slice(0, h.weight.shape[1])) for m, h in self.heads.items()}


@register_fusion("weighted")
class WeightedFusion(SumFusion):
    """Own heads per modality, fused as ``sum_m w_m z_m`` with ``w = M * softmax(alpha)`` learnable.

    The unimodal logits are each head's own output ``z_m`` (the modality's prediction), so they do
    not sum to the fused logits unless the weights are equal.
    """

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.alpha = nn.Parameter(torch.zeros(len(dims)))

    def weights(self) -> Tensor:
        """Current modality weights (sum to M)."""
        return torch.softmax(self.alpha, 0) * len(self.modalities)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.heads[m](features[m]) for m in self.modalities}
        w = self.weights()
        fused = sum(w[i] * uni[m] for i, m in enumerate(self.modalities))
        return fused, uni


@register_fusion("film")
class FiLMFusion(_AuxHeads):
    """FiLM: the first modality's feature is scaled and shifted by a projection of the others.

    ``h = gamma(c) * h_1 + beta(c)`` with ``c`` the concatenation of the other modalities, then a
    linear classifier. Unimodal logits come from auxiliary heads (see module docstring).
    """

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        first, *rest = self.modalities
        d1, dc = dims[first], sum(dims[m] for m in rest)
        self.film = nn.Linear(dc, 2 * d1)
        self.fc = nn.Linear(d1, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        first, *rest = self.modalities
        cond = torch.cat([features[m] for m in rest], 1)
        gamma, beta = self.film(cond).chunk(2, dim=1)
        fused = self.fc((1 + gamma) * features[first] + beta)
        return fused, self.aux_logits(features)


@register_fusion("gated")
class GatedFusion(_AuxHeads):
    """Gated fusion: ``h = sum_m sigmoid(g_m([h_1..h_M])) * tanh(P_m h_m)``, then a linear classifier."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 128) -> None:
        super().__init__(dims, num_classes)
        total = sum(dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.gate = nn.ModuleDict({m: nn.Linear(total, hidden) for m in dims})
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        allf = torch.cat([features[m] for m in self.modalities], 1)
        h = sum(
            torch.sigmoid(self.gate[m](allf)) * torch.tanh(self.proj[m](features[m])) for m in self.modalities
        )
        return self.fc(h), self.aux_logits(features)


@register_fusion("attention")
class AttentionFusion(_AuxHeads):
    """A small transformer over one token per modality (plus a learned modality embedding), mean-pooled."""

    def __init__(
        self, dims: dict[str, int], num_classes: int, d_model: int = 64, heads: int = 4, layers: int = 1
    ) -> None:
        super().__init__(dims, num_classes)
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads}).")
        self.proj = nn.ModuleDict({m: nn.Linear(d, d_model) for m, d in dims.items()})
        self.modality_embed = nn.Parameter(torch.zeros(len(dims), d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        tokens = torch.stack([self.proj[m](features[m]) for m in self.modalities], 1) + self.modality_embed
        fused = self.fc(self.encoder(tokens).mean(1))
        return fused, self.aux_logits(features)


def list_fusions() -> list[str]:
    """Names of the registered fusion heads."""
    return FUSIONS.names()


def create_fusion(name: str, dims: dict[str, int], num_classes: int, **kwargs: Any) -> Fusion:
    """Build the fusion head registered as ``name``; unknown or mistyped options fail with the valid ones."""
    return FUSIONS.create(name, dims, num_classes, **kwargs)
