"""``MultimodalClassifier``: per-modality encoders + a fusion head, following the model contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..types import MultimodalOutput, check_batch
from .fusion import Fusion, create_fusion


def feature_dim(encoder: nn.Module, name: str) -> int:
    """The output dimension an encoder declares through ``out_dim`` (clear error if absent)."""
    dim = getattr(encoder, "out_dim", None)
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(
            f"Encoder for modality {name!r} ({type(encoder).__name__}) has no positive integer `out_dim` "
            f"(found {dim!r}). Set `encoder.out_dim = <feature size>` or pass feature_dims={{{name!r}: d}}."
        )
    return dim


class MultimodalClassifier(nn.Module):
    """Encoders per modality, a fusion head, and ``forward(batch) -> MultimodalOutput``.

    Args:
        encoders: modality name -> encoder mapping ``(B, ...)`` to ``(B, d_m)``; order = modality order.
        num_classes: number of classes.
        fusion: a registered fusion name (see :func:`equimodal.models.list_fusions`) or a ``Fusion``.
        feature_dims: per-modality feature sizes, for encoders without an ``out_dim`` attribute.
        validate_inputs: check each batch for missing modalities and non-finite values (one host
            sync per modality; turn off in tight GPU loops once the data is trusted).
        **fusion_kwargs: passed to the fusion's constructor.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        fusion: str | Fusion = "concat",
        feature_dims: Mapping[str, int] | None = None,
        validate_inputs: bool = True,
        **fusion_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(
                f"MultimodalClassifier needs at least 2 encoders, found {len(encoders)} ({list(encoders)})."
            )
        self.encoders = nn.ModuleDict(dict(encoders))
        dims = {m: (feature_dims or {}).get(m) or feature_dim(e, m) for m, e in self.encoders.items()}
        self.fusion = (
            fusion
            if isinstance(fusion, Fusion)
            else create_fusion(fusion, dims, num_classes, **fusion_kwargs)
        )
        self.num_classes = int(num_classes)
        self.validate_inputs = validate_inputs

    @property
    def modalities(self) -> list[str]:
        """Modality names in order."""
        return list(self.encoders.keys())

    @property
    def auxiliary_heads(self) -> bool:
        """True when unimodal logits come from auxiliary heads on detached features."""
        return bool(getattr(self.fusion, "auxiliary", False))

    def encode(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pooled features of every modality."""
        if self.validate_inputs:
            check_batch(batch, self.modalities)
        return {m: enc(batch[m]) for m, enc in self.encoders.items()}

    def forward(self, batch: Mapping[str, Tensor]) -> MultimodalOutput:
        features = self.encode(batch)
        fused, uni = self.fusion(features)
        return MultimodalOutput(fused, uni, features)
