"""The statistics of comparisons, studies and diagnoses, on plain arrays: paired by seed, with intervals.

- :func:`bootstrap_ci` and :func:`mean_ci`: 95 % percentile bootstrap intervals over seeds (what
  ``compare`` and ``study`` report for paired differences; the resampling is seeded, so a table is
  the same every time it is written).
- :func:`gap_closed`: the fraction of the joint-to-ensemble gap a method closes, with its interval.
- :func:`t_interval`: a Student-t 95 % interval of a mean (``diagnose``: with the few seeds a diagnosis
  usually has, a bootstrap interval is too narrow; the t interval widens honestly).
- :func:`ensemble_accuracy`: a late-fusion ensemble of separately trained branches.
- :func:`paired_differences`: each method against joint training, from a comparison's raw figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip
"""Student's t 0.975 quantiles for 1..30 degrees of freedom (beyond: the normal 1.96)."""


def bootstrap_ci(
    values: np.ndarray, stat: Callable[[np.ndarray], float], n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``stat`` over rows of ``values`` (resampling seeds).

    With fewer than two rows there is no interval: ``(nan, nan)``.
    """
    rng = np.random.default_rng(seed)
    k = values.shape[0]
    if k < 2:
        return (float("nan"), float("nan"))
    stats = [stat(values[rng.integers(0, k, k)]) for _ in range(n)]
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def mean_ci(d: np.ndarray) -> tuple[float, float]:
    """The bootstrap 95 % interval of the mean of ``d`` (one value per seed, e.g. paired differences)."""
    return bootstrap_ci(np.asarray(d)[:, None], lambda r: float(r.mean()))


def gap_closed(method: np.ndarray, joint: np.ndarray, ensemble: np.ndarray) -> tuple[float, float, float]:
    """Fraction of the (ensemble - joint) gap a method closes, paired by seed, with a 95% CI.

    The point estimate is mean(method - joint) / mean(ensemble - joint) over seeds (a ratio of means,
    stable when single seeds have tiny gaps).
    """
    rows = np.stack([method, joint, ensemble], 1)

    def stat(r: np.ndarray) -> float:
        gap = (r[:, 2] - r[:, 1]).mean()
        return float((r[:, 0] - r[:, 1]).mean() / gap) if abs(gap) > 1e-12 else float("nan")

    lo, hi = bootstrap_ci(rows, stat)
    return stat(rows), lo, hi


def t_interval(d: np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``d`` with a Student-t 95 % interval (NaN bounds with one value, all NaN
    with none)."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    if d.size < 2:
        return float(d.mean()), float("nan"), float("nan")
    t = T975[d.size - 2] if d.size - 1 <= len(T975) else 1.96
    half = t * float(d.std(ddof=1)) / np.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits (numerically stable)."""
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def ensemble_accuracy(
    logits: Sequence[np.ndarray], labels: np.ndarray, train_counts: np.ndarray, rule: str
) -> float:
    """Test accuracy of a late-fusion ensemble of separately trained branches.

    Args:
        logits: each branch's test logits (samples x classes), the same samples in the same order.
        labels: the test labels.
        train_counts: the training label counts (the prior of the product rule).
        rule: ``product``: argmax of sum_m log p_m(y|x_m) - (M - 1) log p(y) (the product rule, exact when
            the modalities are conditionally independent given the label; the prior is the training label
            frequency). ``mean``: argmax of the mean of the probabilities.

    Raises:
        ValueError: another rule.
    """
    logp = [log_softmax(np.asarray(x).astype(np.float64)) for x in logits]
    if rule == "product":
        counts = np.asarray(train_counts).astype(np.float64)
        prior = np.log(np.maximum(counts, 1) / counts.sum())
        score = sum(logp) - (len(logp) - 1) * prior
    elif rule == "mean":
        score = sum(np.exp(lp) for lp in logp) / len(logp)
    else:
        raise ValueError(f"Unknown ensemble rule {rule!r}; expected 'product' or 'mean'.")
    return float((score.argmax(1) == labels).mean())


def paired_differences(
    raw: Mapping[str, Mapping[str, Mapping[str, float]]], reference: str = "none"
) -> list[tuple[str, float, float, float]]:
    """Per method, the mean paired (same seed) test-accuracy difference to ``reference`` in pp, with a
    95 % bootstrap interval over seeds (NaN with one seed).

    Args:
        raw: ``{method: {seed: {"test_acc": fraction, ...}}}``, as a comparison's results JSON holds it.
        reference: the method every other is paired with (joint training).
    """
    joint = raw.get(reference, {})
    out = []
    for label, runs in raw.items():
        seeds = [s for s in runs if s in joint and label != reference]
        if not seeds:
            continue
        d = np.array([100 * (runs[s]["test_acc"] - joint[s]["test_acc"]) for s in seeds])
        lo, hi = mean_ci(d)
        out.append((label, float(d.mean()), lo, hi))
    return out
