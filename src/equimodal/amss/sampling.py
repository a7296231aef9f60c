"""Unit scores, sampling and reweighting of AMSS / AMSS+ (Yang et al., TPAMI 2025), vectorised over groups.

Every function works on a padded ``(R, N)`` matrix: one row per *sampling group* (a whole conv weight, a
head projection, or one output row of a fusion-head block), ``N`` the largest group size, and a ``valid``
mask marking real units. One call samples every group of every masked tensor at once; nothing here loops
over units or samples in Python, and nothing synchronises with the host.

Samplers (``n`` = units to keep in a row, see :func:`keep_counts`):

- ``"adaptive"`` (AMSS default): ``n`` distinct units drawn sequentially without replacement with
  probability proportional to the score, as ``torch.multinomial(q, n, replacement=False)`` in the code,
  implemented as an exponential race (Gumbel-top-n): keys ``s_j / E_j`` with ``E_j ~ Exp(1)``, keep the
  ``n`` largest. Zero-score units rank below every positive one and are drawn uniformly among themselves
  only when fewer than ``n`` units have positive score (the code's multinomial would raise there).
- ``"topk"``: the ``n`` largest scores (deterministic; ties broken by index).
- ``"uniform"``: ``n`` units uniformly without replacement (the paper's uniform-sampling ablation).
- ``"bernoulli"``: the code's ablation, each unit kept independently with probability ``q_j`` (ignores
  ``n``; about one unit per group, spec B7).
- ``"poisson"``: each unit kept independently with the exact inclusion probability
  ``pi_j = min(1, c q_j)``, ``c`` found by water-filling so that ``sum_j pi_j = n`` (the count is random
  with mean ``n``).

Inclusion probabilities, used by the AMSS+ inverse-inclusion weights ``1 / pi_j``:

- ``"adaptive"`` with ``inclusion="conditional"`` (default): the *threshold-conditional* probability of
  priority sampling (Duffield, Lund & Thorup 2007) in its Gumbel form (Kool, van Hoof & Welling 2019,
  "Stochastic Beams and Where to Find Them"): with ``kappa`` the ``(n+1)``-th largest key,
  ``pi_j = P(s_j / E_j > kappa) = 1 - exp(-s_j / kappa)``. Given every other unit's key, unit ``j`` is
  kept exactly when its key beats the ``n``-th largest of the others, which is ``kappa`` whenever ``j``
  is kept; so ``E[1{j kept} / pi_j] = 1`` for every unit: exactly unbiased, while keeping exactly
  ``n`` units. ``inclusion="first_order"`` uses the approximation ``min(1, n q_j)`` instead (biased).
- ``"uniform"``: ``n / N`` (exact); ``"poisson"``: the water-filled ``pi_j`` (exact);
  ``"bernoulli"``: ``q_j`` (exact); ``"topk"``: 1 (deterministic, so no reweighting can unbias it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScoreMode = Literal["gn", "gn_wn", "sqrt_gn"]
SamplerName = Literal["adaptive", "topk", "uniform", "bernoulli", "poisson"]
InclusionMode = Literal["conditional", "first_order"]
ReweightMode = Literal["none", "inverse_inclusion", "code"]
Rounding = Literal["ceil", "floor"]

SCORE_MODES: tuple[str, ...] = ("gn", "gn_wn", "sqrt_gn")
SAMPLERS: tuple[str, ...] = ("adaptive", "topk", "uniform", "bernoulli", "poisson")
INCLUSION_MODES: tuple[str, ...] = ("conditional", "first_order")
REWEIGHT_MODES: tuple[str, ...] = ("none", "inverse_inclusion", "code")
ROUNDINGS: tuple[str, ...] = ("ceil", "floor")

#: Relative tolerance of :func:`keep_counts`: ``k * N`` within this of an integer counts as that integer.
COUNT_TOLERANCE = 1e-6


def unit_scores(sq_norm: Tensor, mode: ScoreMode = "gn", weight_sq_norm: Tensor | None = None) -> Tensor:
    """Return AMSS's importance score of each unit from its squared gradient norm (empirical Fisher).

    Args:
        sq_norm: ``sum g^2`` over each unit's weights.
        mode: ``"gn"``: ``sum g^2`` (every official command); ``"sqrt_gn"``: ``sqrt(sum g^2)``;
            ``"gn_wn"``: ``sum g^2 / sum w^2``. Deviation: for attention heads and fusion elements the
            code's non-default modes sum element-wise ratios; here every mode is a per-unit ratio.
        weight_sq_norm: ``sum w^2`` per unit, required for ``"gn_wn"``.
    """
    if mode == "gn":
        return sq_norm
    if mode == "sqrt_gn":
        return sq_norm.sqrt()
    if mode == "gn_wn":
        if weight_sq_norm is None:
            raise ValueError("score mode 'gn_wn' needs weight_sq_norm (sum of squared weights per unit).")
        return sq_norm / weight_sq_norm.clamp_min(torch.finfo(sq_norm.dtype).tiny)
    raise ValueError(f"score mode must be one of {', '.join(map(repr, SCORE_MODES))}, found {mode!r}.")


def floored_scores(scores: Tensor, floor: float, valid: Tensor | None = None) -> Tensor:
    """Scores with a defensive floor: ``s_j + floor * mean_j(s)`` over each row's real units (AMSS+).

    The sampling distribution becomes a mixture of the importance scores and a uniform one (defensive
    importance sampling, Hesterberg 1995): every live unit's inclusion probability is bounded below, so
    the inverse-inclusion weights stay bounded and a cap rarely binds, which keeps AMSS+ unbiased where
    capping alone loses 10-20 % of the expected gradient at the ratio floor ``k = 0.1``. A row whose
    scores are all zero is left as it is. ``floor = 0`` returns ``scores``.
    """
    if floor == 0:
        return scores
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"score_floor must be a finite number >= 0, found {floor!r}.")
    valid = _row_valid(scores, valid)
    live = torch.where(valid, scores, torch.zeros_like(scores))
    mean = live.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1).to(scores.dtype)
    return torch.where(valid, scores + floor * mean, scores)


def keep_counts(ratio: Tensor, num_units: Tensor, rounding: Rounding = "ceil") -> Tensor:
    """Return how many units each AMSS group keeps: ``ceil(k * N)`` (or ``floor``), clamped to ``[1, N]``.

    ``k * N`` within a relative ``1e-6`` of an integer is taken as that integer, so float round-off
    (``0.3 * 10 = 3.0000000000000004``) does not add a unit. The code used ``ceil`` for backbone tensors
    and ``floor`` for the fusion head in two of its three code bases (B7); both round to at least 1 here.

    Args:
        ratio: ``(R,)`` update ratio of each group's modality.
        num_units: ``(R,)`` units per group.
        rounding: ``"ceil"`` (default) or ``"floor"``.
    """
    x = ratio.to(torch.float32) * num_units.to(torch.float32)
    if rounding == "ceil":
        n = torch.ceil(x * (1.0 - COUNT_TOLERANCE))
    elif rounding == "floor":
        n = torch.floor(x * (1.0 + COUNT_TOLERANCE))
    else:
        raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, found {rounding!r}.")
    n = torch.where(torch.isfinite(n), n, num_units.to(n.dtype))
    return torch.minimum(n.long().clamp_min(1), num_units.long())


def _row_valid(scores: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(scores, dtype=torch.bool) if valid is None else valid


def water_filling(scores: Tensor, num_keep: Tensor, valid: Tensor | None = None) -> Tensor:
    """Return exact Poisson inclusion probabilities ``min(1, c q_j)``, ``sum_j pi_j = n`` per row (AMSS+).

    Sorts each row once and picks, for every row at once, the smallest number ``t`` of capped units for
    which the rescaled ``(t+1)``-th largest score stays below one. Rows with fewer than ``n`` positive
    scores give every positive unit probability 1 and spread the rest uniformly over the zero-score units.

    Args:
        scores: ``(R, N)`` non-negative scores.
        num_keep: ``(R,)`` expected number of units to keep, ``1 <= n <= N_valid``.
        valid: ``(R, N)`` mask of real units (padding is never kept).
    """
    valid = _row_valid(scores, valid)
    s = torch.where(valid, scores, torch.zeros_like(scores))
    sv, order = s.sort(1, descending=True)
    num_valid = valid.sum(1).to(s.dtype)
    n = num_keep.to(s.dtype).unsqueeze(1)
    t = torch.arange(s.shape[1], device=s.device, dtype=s.dtype)
    suffix = sv.flip(1).cumsum(1).flip(1)
    scale = (n - t) / suffix
    cond = (t < n) & ((suffix <= 0) | (scale * sv <= 1.0))
    tstar = cond.to(torch.int8).argmax(1, keepdim=True)
    rest = suffix.gather(1, tstar)
    scale_t = (n - tstar.to(s.dtype)) / rest
    uniform_rest = (n - tstar.to(s.dtype)) / (num_valid.unsqueeze(1) - tstar.to(s.dtype)).clamp_min(1)
    pi_sorted = torch.where(rest > 0, scale_t * sv, uniform_rest.expand_as(sv))
    pi_sorted = torch.where(t < tstar, torch.ones_like(sv), pi_sorted).clamp(0.0, 1.0)
    pi = torch.empty_like(pi_sorted).scatter_(1, order, pi_sorted)
    return torch.where(valid, pi, torch.zeros_like(pi))


def sample_units(
    scores: Tensor,
    num_keep: Tensor,
    *,
    sampler: SamplerName = "adaptive",
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
    inclusion: InclusionMode = "conditional",
) -> tuple[Tensor, Tensor]:
    """Sample the kept units of every group (row) at once, AMSS's subnetwork sampling.

    Every call draws exactly ``R * N`` exponential variates from ``generator`` whatever the sampler and
    the data, so generators seeded alike stay in step (DDP ranks, resumed runs).

    Args:
        scores: ``(R, N)`` non-negative unit scores (see :func:`unit_scores`).
        num_keep: ``(R,)`` units to keep per row (see :func:`keep_counts`); ignored by ``"bernoulli"``
            and the mean count for ``"poisson"``.
        sampler: one of ``"adaptive"``, ``"topk"``, ``"uniform"``, ``"bernoulli"``, ``"poisson"``.
        generator: source of randomness (``None``: the global generator).
        valid: ``(R, N)`` mask of real units; padding is never kept.
        inclusion: for ``"adaptive"``, ``"conditional"`` (exact, default) or ``"first_order"``.

    Returns:
        ``(keep, pi)``: a bool ``(R, N)`` mask of kept units and each unit's inclusion probability
        (see the module docstring); ``pi`` is only meaningful where ``keep`` is true.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, found {sampler!r}.")
    if inclusion not in INCLUSION_MODES:
        raise ValueError(
            f"inclusion must be one of {', '.join(map(repr, INCLUSION_MODES))}, found {inclusion!r}."
        )
    valid = _row_valid(scores, valid)
    num_rows, width = scores.shape
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    expo = torch.empty_like(scores).exponential_(generator=generator)
    ones = torch.ones_like(scores)
    if sampler in ("bernoulli", "poisson"):
        return _independent(scores, expo, num_keep, valid, sampler)
    neg_inf = torch.full_like(scores, -math.inf)
    positive = valid & (scores > 0)
    if sampler == "adaptive":
        key = torch.where(positive, scores / expo, torch.where(valid, -expo, neg_inf))
    elif sampler == "uniform":
        key = torch.where(valid, -expo, neg_inf)
    else:  # topk
        key = torch.where(valid, scores, neg_inf)
    values, order = key.sort(dim=1, descending=True, stable=sampler == "topk")
    positions = torch.arange(width, device=scores.device).expand(num_rows, width)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    n = num_keep.unsqueeze(1)
    keep = valid & (ranks < n)
    num_valid = valid.sum(1, keepdim=True)
    if sampler == "uniform":
        return keep, (n.to(scores.dtype) / num_valid.clamp_min(1).to(scores.dtype)).expand_as(scores)
    if sampler == "topk":
        return keep, ones
    pi = _adaptive_inclusion(scores, values, n, num_valid, inclusion)
    return keep, torch.where(positive, pi, ones)


def _independent(
    scores: Tensor, expo: Tensor, num_keep: Tensor, valid: Tensor, sampler: str
) -> tuple[Tensor, Tensor]:
    """``"bernoulli"`` and ``"poisson"``: each unit kept on its own, with probability ``q_j`` or the
    water-filled ``pi_j``, from the uniform variates ``exp(-expo)``; returns ``(keep, pi)``."""
    uniform = torch.exp(-expo)  # Uniform(0, 1) from the same draws
    if sampler == "poisson":
        pi = water_filling(scores, num_keep, valid)
    else:
        total = scores.sum(1, keepdim=True)
        pi = torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), 0.0)
    return valid & (uniform < pi), pi


def _adaptive_inclusion(
    scores: Tensor, values: Tensor, n: Tensor, num_valid: Tensor, inclusion: str
) -> Tensor:
    """The adaptive sampler's inclusion probabilities: threshold-conditional on ``kappa``, the
    ``(n+1)``-th largest of the sorted keys ``values`` (exact), or the first-order ``min(1, n q_j)``."""
    if inclusion == "first_order":
        total = scores.sum(1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        return (n.to(scores.dtype) * scores / total).clamp(max=1.0)
    kappa = values.gather(1, n.clamp(max=scores.shape[1] - 1))
    has_next = (n < num_valid) & (kappa > 0)
    inv_kappa = torch.where(has_next, 1.0 / kappa, torch.full_like(kappa, math.inf))
    return -torch.expm1(-scores * inv_kappa)


def inverse_inclusion_weights(keep: Tensor, pi: Tensor, max_weight: float | None = 10.0) -> Tensor:
    """Return AMSS+'s unbiased weights ``1 / pi_j`` for kept units (0 for dropped), capped at ``max_weight``.

    Unbiased (``E[w_j] = 1`` per unit) whenever ``pi`` is exact and no weight hits the cap; the cap trades
    a little bias on rarely kept units for bounded gradient amplification (spec section 16).
    """
    w = 1.0 / pi.clamp_min(torch.finfo(pi.dtype).tiny)
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return torch.where(keep, w, torch.zeros_like(w))


def code_weights(keep: Tensor, q: Tensor, num_units: Tensor, bias: float = 0.0) -> Tensor:
    """Return the official AMSS+ weights ``1 / (q_j + 1/R + b)`` for kept units (0 for dropped).

    Warning:
        These are *not* inverse inclusion probabilities and are not unbiased: with near-uniform scores
        the weight is about ``N / 2`` (x32 to x256 for ResNet filters when ``b = 0``), it is largest for
        dead units (``q = 0``); on mfeat fac+mor with SGD lr 0.05 it amplified gradients about 10x and
        made the loss non-finite in most epochs (docs/amss.md). Use only to reproduce the official numbers.

    Args:
        keep: ``(R, N)`` kept-unit mask.
        q: ``(R, N)`` normalised scores (per group or per fusion block).
        num_units: ``(R,)`` the code's ``R`` per row (units per group; output rows for the fusion head).
        bias: the code's ``--bias`` ``b`` (0 audio-visual, 0.2 text-image).
    """
    w = 1.0 / (q + 1.0 / num_units.to(q.dtype).unsqueeze(1) + bias)
    return torch.where(keep, w, torch.zeros_like(w))
