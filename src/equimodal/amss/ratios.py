"""Update ratios of AMSS (Yang et al., TPAMI 2025): the fraction ``k_m`` of each modality's units kept.

Default (spec section 2.3): ``k_m = clip(1 - softmax(rho / T)_m + bias, k_min, k_max)``, non-finite values
and a fired fallback replaced by ``fallback_ratio``. For M = 2 this equals the audio-visual code
(``k_m = sigmoid((rho_other - rho_m) / T)``) and for M = 3 the three-modality code; the more significant
(dominant) modality gets the *smaller* ratio.

Deviations from the official code, all behind options (corrected behaviour is the default):

- ``stable=True`` computes the softmax stably; the code used a raw ``exp``, which overflows for large
  ``rho / T`` and then falls back to 0.5 through its NaN check (``stable=False`` reproduces that).
- ``form="softmax_own"`` reproduces bug B1 of the text-image code, where each modality gets its *own*
  softmax weight (the dominant modality gets the larger ratio).
- ``form="softmax_neg"`` (``softmax(-rho / T)``, not in the code) equals the default for M = 2 and sums to
  one for M > 2.

A fixed ratio (the paper's fixed-ratio ablation, ``k`` in {0.1, 0.3, 0.5, 0.7, 0.9}) replaces all of this:
:func:`fixed_ratios` gives every modality the same ``k`` at every step (checked by
:func:`check_fixed_ratio`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

RatioForm = Literal["one_minus_softmax", "softmax_neg", "softmax_own"]
RATIO_FORMS: tuple[str, ...] = ("one_minus_softmax", "softmax_neg", "softmax_own")


def check_ratio_options(
    temperature: float,
    k_min: float,
    k_max: float,
    fallback_ratio: float | None = None,
    form: str | None = None,
) -> None:
    """Check AMSS ratio options: ``ValueError`` for T <= 0, bounds outside (0, 1] or an unknown form."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0, found {temperature!r}. The official settings use 0.2 "
            "(audio-visual, three-modality) and 0.5 (text-image)."
        )
    for name, value in (("k_min", k_min), ("k_max", k_max)):
        if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name} must lie in (0, 1], found {value!r}. The official bounds are 0.1 and 0.9."
            )
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must be <= k_max ({k_max}).")
    if fallback_ratio is not None and not 0.0 < fallback_ratio <= 1.0:
        raise ValueError(
            f"fallback_ratio must lie in (0, 1], found {fallback_ratio!r}. The official value is 0.5."
        )
    if form is not None and form not in RATIO_FORMS:
        raise ValueError(f"ratio form must be one of {', '.join(map(repr, RATIO_FORMS))}, found {form!r}.")


def check_fixed_ratio(ratio: object) -> float | None:
    """Return a fixed update ratio as a float (``None`` stays ``None``); ``ValueError`` outside (0, 1]."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(
            f"ratio must lie in (0, 1] (the fixed update ratio of every modality) or be None (the adaptive, "
            f"significance-based ratios), found {ratio!r}. The paper's fixed-ratio ablation uses 0.1, 0.3, "
            "0.5, 0.7 and 0.9."
        )
    return float(ratio)


def fixed_ratios(ratio: float, like: Tensor) -> Tensor:
    """Every modality's update ratio set to the fixed ``ratio`` (shape, dtype and device of ``like``)."""
    value = check_fixed_ratio(ratio)
    if value is None:
        raise ValueError("fixed_ratios needs a ratio in (0, 1], found None.")
    return torch.full_like(like, value)


def update_ratios(
    rho: Tensor,
    temperature: float,
    *,
    form: RatioForm = "one_minus_softmax",
    bias: float = 0.0,
    k_min: float = 0.1,
    k_max: float = 0.9,
    fallback: Tensor | bool | None = None,
    fallback_ratio: float | Tensor = 0.5,
    stable: bool = True,
) -> Tensor:
    """Return AMSS's update ratios ``k_m`` from the mutual-information rates ``rho`` (any M >= 2).

    Args:
        rho: ``(M,)`` mutual-information rates.
        temperature: softmax temperature ``T > 0``.
        form: ``"one_minus_softmax"`` (default), ``"softmax_neg"`` or ``"softmax_own"`` (bug B1).
        bias: ratio bias ``beta`` added before clamping (the three-modality code's ``--bias``).
        k_min: lower clamp, in (0, 1].
        k_max: upper clamp, in (0, 1].
        fallback: when true (a 0-d bool tensor or bool), every ratio is ``fallback_ratio``.
        fallback_ratio: the fixed ratio (a float, or an ``(M,)`` tensor) used on fallback and for
            non-finite entries.
        stable: stable softmax (default); ``False`` uses the code's raw ``exp``.

    Returns:
        ``(M,)`` ratios; no host synchronisation.
    """
    check_ratio_options(temperature, k_min, k_max, form=form)
    if rho.dim() != 1 or rho.shape[0] < 2:
        raise ValueError(f"rho must have shape (M,) with M >= 2, found {tuple(rho.shape)}.")
    z = rho / temperature
    if form == "softmax_neg":
        z = -z
    if stable:
        s = torch.softmax(z, 0)
    else:
        e = torch.exp(z)
        s = e / e.sum()
    k = 1.0 - s if form == "one_minus_softmax" else s
    k = (k + bias).clamp(k_min, k_max)
    fb = torch.as_tensor(fallback_ratio, dtype=k.dtype, device=k.device).expand_as(k)
    bad = ~torch.isfinite(k)
    if fallback is not None:
        bad = bad | torch.as_tensor(fallback, device=k.device)
    return torch.where(bad, fb, k)
