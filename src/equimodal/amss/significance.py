"""Modal significance of AMSS (Yang et al., "Learning to Rebalance Multi-Modal Optimization by Adaptively
Masking Subnetworks", TPAMI 2025): label entropy, feature-entropy proxy and the mutual-information rate.

For one batch with labels ``y`` and per-modality unimodal logits ``z_m`` and pooled features ``h_m``:

- ``H_Y``: entropy of the batch label histogram (``label_entropy``);
- ``I_m = H_Y - CE(z_m, y)``: the Barber-Agakov lower bound of the mutual information;
- ``H_m``: a proxy of the input entropy, the entropy of ``softmax(h_m)`` over feature dimensions
  (``feature_entropy``);
- ``rho_m = (I_m + offset) / H_m``: the mutual-information rate;
- the fallback fires when any ``I_m + fallback_offset <= 0`` (the balancer then uses fixed ratios).

Everything works from additive *sums* (sample count, per-modality CE sums, feature-entropy sums and the
label histogram) so that micro-batches and DDP ranks combine exactly: k micro-batches give the statistics
of one batch holding all of them, and one ``all_reduce`` of a small vector synchronises ranks.

Deviations from the official code (spec sections 2.2 and 14, B6) are options, the corrected form is the
default: the label entropy is the exact histogram entropy in nats (``"av_code"`` reproduces the
audio-visual quirk, ``"exact_bits"`` the text-image / three-modality base-2 form); the feature entropy
is the batch mean in nats (``"nv_code"`` is the three-modality sum-in-bits / 40, ``"none"`` the
text-image form without a denominator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LabelEntropyMode = Literal["exact", "exact_bits", "av_code"]
FeatureEntropyMode = Literal["mean", "none", "nv_code"]

LABEL_ENTROPY_MODES: tuple[str, ...] = ("exact", "exact_bits", "av_code")
FEATURE_ENTROPY_MODES: tuple[str, ...] = ("mean", "none", "nv_code")

#: Divisor of the three-modality code's feature entropy (batch 4 x log2(1024) feature dimensions).
NV_CODE_ENTROPY_DIVISOR = 40.0


def check_choice(name: str, value: object, valid: Sequence[object]) -> None:
    """Raise a ``ValueError`` naming option ``name``, its choices and ``value`` unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, found {value!r}.")


def label_entropy(counts: Tensor, mode: LabelEntropyMode = "exact") -> Tensor:
    """Return the entropy of a label histogram, the ``H_Y`` of AMSS's mutual-information bound.

    Args:
        counts: class counts of shape ``(C,)`` (any non-negative values; only proportions matter).
        mode: ``"exact"``: ``-sum p log p`` in nats (default); ``"exact_bits"``: the same in bits (the
            text-image and three-modality code); ``"av_code"``: the audio-visual code's quirk
            ``logsumexp(p) - sum p^2`` over classes ``0..max label present`` (equal to the true
            entropy only for a uniform histogram).

    Returns:
        A 0-d tensor (no host synchronisation).
    """
    check_choice("label_entropy", mode, LABEL_ENTROPY_MODES)
    counts = counts.to(torch.float32) if not counts.is_floating_point() else counts
    p = counts / counts.sum().clamp_min(torch.finfo(counts.dtype).tiny)
    if mode == "av_code":
        idx = torch.arange(p.shape[0], device=p.device)
        last = torch.where(counts > 0, idx, torch.zeros_like(idx)).amax()
        masked = torch.where(idx <= last, p, torch.full_like(p, -math.inf))
        return torch.logsumexp(masked, 0) - (p * p).sum()
    h = -torch.special.xlogy(p, p).sum()
    return h / math.log(2.0) if mode == "exact_bits" else h


def feature_entropy_per_sample(features: Tensor) -> Tensor:
    """Return the entropy (nats) of ``softmax(h)`` over features for each sample (AMSS's ``H(X_m)`` proxy).

    This is AMSS's proxy of a modality's input entropy ``H(X_m)``, computed stably as
    ``logsumexp(h) - sum softmax(h) * h``.

    Args:
        features: pooled features ``(B, d)``; any extra trailing dimensions are flattened.
    """
    h = features.detach().flatten(1).to(torch.float32)
    log_p = torch.log_softmax(h, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def feature_entropy_from_sums(
    entropy_sums: Tensor, count: Tensor, mode: FeatureEntropyMode = "mean"
) -> Tensor:
    """Turn per-modality sums of per-sample feature entropies (nats) into AMSS's denominator ``H_m``.

    Args:
        entropy_sums: ``(M,)`` sums over samples of :func:`feature_entropy_per_sample`.
        count: number of samples (0-d tensor or float).
        mode: ``"mean"``: batch mean in nats (default, the audio-visual code); ``"nv_code"``: sum in
            bits divided by 40 (the three-modality code); ``"none"``: 1 (the text-image code has no
            denominator).
    """
    check_choice("feature_entropy", mode, FEATURE_ENTROPY_MODES)
    if mode == "none":
        return torch.ones_like(entropy_sums)
    if mode == "nv_code":
        return entropy_sums / math.log(2.0) / NV_CODE_ENTROPY_DIVISOR
    return entropy_sums / torch.as_tensor(
        count, dtype=entropy_sums.dtype, device=entropy_sums.device
    ).clamp_min(1)


def mutual_information_rate(
    mutual_information: Tensor,
    feature_entropy: Tensor,
    *,
    offset: float = 0.5,
    fallback_offset: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Return AMSS's mutual-information rate ``rho_m = (I_m + offset) / H_m`` and the fallback flag.

    Args:
        mutual_information: ``(M,)`` lower bounds ``I_m = H_Y - CE_m``.
        feature_entropy: ``(M,)`` denominators ``H_m``.
        offset: the ratio offset ``c`` (0.5 audio-visual, 0 text-image, 3 three-modality code).
        fallback_offset: threshold offset of the fallback test ``any(I_m + fallback_offset <= 0)``
            (0.5 audio-visual and text-image, 2 three-modality); ``None`` uses ``offset``.

    Returns:
        ``(rho, fallback)``: ``rho`` of shape ``(M,)`` and a 0-d bool tensor.
    """
    thr = offset if fallback_offset is None else fallback_offset
    rho = (mutual_information + offset) / feature_entropy
    fallback = (mutual_information + thr <= 0).any()
    return rho, fallback


@torch.no_grad()
def batch_sums(
    unimodal_logits: Mapping[str, Tensor],
    target: Tensor,
    features: Mapping[str, Tensor] | None,
    modalities: Sequence[str],
    *,
    need_features: bool = True,
) -> Tensor:
    """Return AMSS's additive significance statistics ``[n, ce_sum(M), entropy_sum(M), counts(C)]``.

    Args:
        unimodal_logits: ``(B, C)`` logits per modality.
        target: labels ``(B,)``.
        features: pooled features per modality, or ``None`` when ``need_features`` is False.
        modalities: modality names, in model order.
        need_features: whether to compute feature entropies (else zeros).
    """
    logits = torch.stack([unimodal_logits[m].detach() for m in modalities]).to(torch.float32)
    num_m, batch, num_classes = logits.shape
    ce = F.cross_entropy(logits.reshape(num_m * batch, num_classes), target.repeat(num_m), reduction="none")
    ce_sum = ce.view(num_m, batch).sum(1)
    if need_features:
        if features is None:
            raise ValueError(
                "AMSS's feature-entropy denominator needs pooled features, but the model returned "
                "MultimodalOutput(features=None). Return the pooled features from forward, or build the "
                "balancer with feature_entropy='none' (the text-image code's form)."
            )
        ent = torch.stack([feature_entropy_per_sample(features[m]).sum() for m in modalities])
    else:
        ent = torch.zeros_like(ce_sum)
    counts = torch.zeros(num_classes, device=logits.device).index_add_(
        0, target, torch.ones(batch, device=logits.device)
    )
    n = torch.full((1,), float(batch), device=logits.device)
    return torch.cat([n, ce_sum, ent.to(ce_sum.dtype), counts])


def significance_from_sums(
    sums: Tensor,
    num_modalities: int,
    *,
    label_entropy_mode: LabelEntropyMode = "exact",
    feature_entropy_mode: FeatureEntropyMode = "mean",
    offset: float = 0.5,
    fallback_offset: float | None = None,
) -> dict[str, Tensor]:
    """Compute AMSS's significance from summed :func:`batch_sums` (after any DDP all-reduce).

    Returns:
        A dict of tensors: ``rho`` ``(M,)``, ``mi`` ``(M,)`` (the bounds ``I_m``), ``ce`` ``(M,)``,
        ``feature_entropy`` ``(M,)``, ``label_entropy`` (0-d) and ``fallback`` (0-d bool).
    """
    m = num_modalities
    n = sums[0]
    ce = sums[1 : 1 + m] / n.clamp_min(1)
    h_x = feature_entropy_from_sums(sums[1 + m : 1 + 2 * m], n, feature_entropy_mode)
    h_y = label_entropy(sums[1 + 2 * m :], label_entropy_mode)
    mi = h_y - ce
    rho, fallback = mutual_information_rate(mi, h_x, offset=offset, fallback_offset=fallback_offset)
    return {
        "rho": rho,
        "mi": mi,
        "ce": ce,
        "feature_entropy": h_x,
        "label_entropy": h_y,
        "fallback": fallback,
    }


def significance(
    unimodal_logits: Mapping[str, Tensor],
    target: Tensor,
    features: Mapping[str, Tensor] | None = None,
    *,
    label_entropy_mode: LabelEntropyMode = "exact",
    feature_entropy_mode: FeatureEntropyMode = "mean",
    offset: float = 0.5,
    fallback_offset: float | None = None,
) -> dict[str, Tensor]:
    """Compute AMSS's modal significance of one batch (convenience wrapper of the two steps above).

    Args:
        unimodal_logits: ``(B, C)`` logits per modality (dict order = modality order).
        target: labels ``(B,)``.
        features: pooled features ``(B, d_m)`` per modality (not needed with ``feature_entropy_mode="none"``).
        label_entropy_mode: see :func:`label_entropy`.
        feature_entropy_mode: see :func:`feature_entropy_from_sums`.
        offset: ratio offset ``c``.
        fallback_offset: fallback threshold offset (``None``: same as ``offset``).
    """
    names = list(unimodal_logits)
    sums = batch_sums(unimodal_logits, target, features, names, need_features=feature_entropy_mode != "none")
    return significance_from_sums(
        sums,
        len(unimodal_logits),
        label_entropy_mode=label_entropy_mode,
        feature_entropy_mode=feature_entropy_mode,
        offset=offset,
        fallback_offset=fallback_offset,
    )
