"""The model contract: ``MultimodalOutput`` and the checks every balancer relies on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

LABEL_KEY = "label"


class MultimodalOutput(NamedTuple):
    """What a multimodal model's ``forward`` returns.

    Attributes:
        logits: fused logits, shape ``(B, C)``.
        unimodal_logits: each modality's own logits, shape ``(B, C)``, keyed by modality name in
            the order of ``model.encoders``.
        features: each modality's pooled encoder feature ``(B, d_m)``, or ``None``.
    """

    logits: Tensor
    unimodal_logits: dict[str, Tensor]
    features: dict[str, Tensor] | None = None


def modality_names(model: nn.Module) -> list[str]:
    """Return the modality names of a model that follows the contract (keys of ``model.encoders``)."""
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        found = type(encoders).__name__ if encoders is not None else "no `encoders` attribute"
        raise TypeError(
            "Expected a model with `encoders: nn.ModuleDict` (one encoder per modality), "
            f"found {found} on {type(model).__name__}. Wrap your per-modality encoders in "
            "nn.ModuleDict({'audio': ..., 'video': ...}) and assign it to `model.encoders`."
        )
    names = list(encoders.keys())
    if len(names) < 2:
        raise ValueError(
            f"Expected at least 2 modalities in `model.encoders`, found {len(names)} ({names}). "
            "Balancing needs two or more modalities; for one modality train without a balancer."
        )
    return names


def output_features(out: MultimodalOutput, needs: str, fix: str = "") -> dict[str, Tensor]:
    """``out.features``, or a ``ValueError`` saying that ``needs`` (what the caller does with them) cannot
    work without them and how the model returns them (``fix``: another way out, appended)."""
    if out.features is None:
        raise ValueError(
            f"{needs}, but the model's output has features=None. Return MultimodalOutput(logits, "
            "unimodal_logits, features={modality: pooled (B, d) encoder output, not detached}) from forward"
            f"{fix}."
        )
    return dict(out.features)


def check_batch(batch: Mapping[str, Tensor], modalities: Sequence[str]) -> None:
    """Raise a clear error if ``batch`` lacks a modality or holds a non-finite input."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Expected the batch to be a mapping of modality name to tensor, found {type(batch).__name__}. "
            "Pass e.g. {'audio': a, 'video': v} (an extra 'label' key is ignored)."
        )
    missing = [m for m in modalities if m not in batch]
    if missing:
        raise ValueError(
            f"Batch is missing modality {missing} (expected keys {list(modalities)}, "
            f"found {sorted(batch.keys())}). Make the dataset yield one tensor per modality name "
            "in `model.encoders`."
        )
    sizes: dict[str, int] = {}
    for m in modalities:
        x = batch[m]
        if not isinstance(x, Tensor):
            raise TypeError(f"Batch entry {m!r} must be a Tensor, found {type(x).__name__}.")
        if x.dim() == 0:
            raise ValueError(f"Batch entry {m!r} is a scalar; expected a (batch, ...) tensor.")
        sizes[m] = int(x.shape[0])
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"The modalities hold different numbers of samples: {sizes} (the first dimension of each "
                "tensor is its batch size). Give every modality one row per sample of the batch."
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            n_bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"Input for modality {m!r} holds {n_bad} non-finite values (NaN or inf). "
                "Clean or impute the data before training (e.g. torch.nan_to_num)."
            )


def check_output(out: object, modalities: Sequence[str], target: Tensor | None = None) -> MultimodalOutput:
    """Validate a model output against the contract and (optionally) the labels.

    Checks that ``out`` is a ``MultimodalOutput``, that every modality has unimodal logits of the
    fused logits' shape, and that labels are integer class indices in range.
    """
    if not isinstance(out, MultimodalOutput):
        raise TypeError(
            f"Expected the model to return equimodal.MultimodalOutput, found {type(out).__name__}. "
            "Return MultimodalOutput(logits=fused, unimodal_logits={name: logits, ...}, features=...)."
        )
    logits = out.logits
    if logits.dim() != 2:
        raise ValueError(
            f"Expected fused logits of shape (batch, classes), found shape {tuple(logits.shape)}."
        )
    if not isinstance(out.unimodal_logits, Mapping):
        raise TypeError(
            f"Expected `unimodal_logits` to be a dict keyed by modality, found {type(out.unimodal_logits).__name__}."
        )
    missing = [m for m in modalities if m not in out.unimodal_logits]
    if missing:
        raise ValueError(
            f"`unimodal_logits` is missing modality {missing} (expected {list(modalities)}, found "
            f"{list(out.unimodal_logits)}). Every modality of `model.encoders` needs unimodal logits; "
            "use a fusion head from equimodal.models or add auxiliary per-modality heads."
        )
    for m in modalities:
        shape = tuple(out.unimodal_logits[m].shape)
        if shape != tuple(logits.shape):
            raise ValueError(
                f"unimodal_logits[{m!r}] has shape {shape}, expected {tuple(logits.shape)} (the fused logits' shape)."
            )
    if target is not None:
        check_target(target, logits.shape[0], logits.shape[1])
    return out


def check_target(target: Tensor, batch_size: int, num_classes: int) -> None:
    """Raise if labels are not integer class indices in ``[0, num_classes)`` matching the batch size."""
    if not isinstance(target, Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        found = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"Expected integer class labels (torch.long), found {found}. Use target.long().")
    if target.dim() != 1 or target.shape[0] != batch_size:
        raise ValueError(
            f"Expected labels of shape ({batch_size},), found {tuple(target.shape)}. "
            "Pass one class index per sample (not one-hot)."
        )
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"Labels must lie in [0, {num_classes - 1}] for {num_classes} classes, found range [{lo}, {hi}]. "
                "Remap labels to 0..C-1 or build the model with more classes."
            )
