"""Property tests of AMSS's sampling: counts, samplers, exact inclusion probabilities and unbiasedness."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.amss.sampling import (
    code_weights,
    inverse_inclusion_weights,
    keep_counts,
    sample_units,
    unit_scores,
    water_filling,
)

SETTINGS = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def padded_rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths, some scores zero, and a keep count per row."""
    rows = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 9)) for _ in range(rows)]
    width = max(sizes)
    scores = torch.zeros(rows, width)
    valid = torch.zeros(rows, width, dtype=torch.bool)
    n = []
    for r, size in enumerate(sizes):
        vals = draw(st.lists(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 7.0]), min_size=size, max_size=size))
        scores[r, :size] = torch.tensor(vals)
        valid[r, :size] = True
        n.append(draw(st.integers(1, size)))
    return scores, valid, torch.tensor(n)


@SETTINGS
@given(st.integers(1, 600), st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]))
def test_keep_counts_are_ceil_of_k_n(num: int, k: float) -> None:
    expected = math.ceil(Fraction(str(k)) * num)  # exact decimal arithmetic
    assert keep_counts(torch.tensor([k]), torch.tensor([num])).item() == max(1, expected)
    floor = math.floor(Fraction(str(k)) * num)
    assert keep_counts(torch.tensor([k]), torch.tensor([num]), "floor").item() == max(1, floor)


def test_keep_counts_clamp_and_nan() -> None:
    n = keep_counts(torch.tensor([0.001, 1.0, float("nan")]), torch.tensor([10, 10, 10]))
    assert n.tolist() == [1, 10, 10]
    with pytest.raises(ValueError, match="rounding"):
        keep_counts(torch.tensor([0.5]), torch.tensor([4]), "round")  # type: ignore[arg-type]


@SETTINGS
@given(padded_rows(), st.sampled_from(["adaptive", "topk", "uniform"]), st.integers(0, 99))
def test_exact_count_kept_and_padding_never_kept(rows: tuple, sampler: str, seed: int) -> None:
    scores, valid, n = rows
    keep, pi = sample_units(scores, n, sampler=sampler, generator=gen(seed), valid=valid)  # type: ignore[arg-type]
    assert keep.sum(1).tolist() == n.tolist()
    assert not bool((keep & ~valid).any())
    assert bool(torch.isfinite(pi[keep]).all()) and bool(((pi[keep] > 0) & (pi[keep] <= 1)).all())


@SETTINGS
@given(padded_rows(), st.integers(0, 99))
def test_adaptive_keeps_positive_units_first(rows: tuple, seed: int) -> None:
    """Zero-score units do not crash the sampler; they are only used when positives run out."""
    scores, valid, n = rows
    keep, _ = sample_units(scores, n, generator=gen(seed), valid=valid)
    positive = (scores > 0) & valid
    for r in range(scores.shape[0]):
        num_pos = int(positive[r].sum())
        kept_pos = int((keep[r] & positive[r]).sum())
        assert kept_pos == min(num_pos, int(n[r]))


def test_all_zero_scores_do_not_crash() -> None:
    scores = torch.zeros(3, 5)
    for sampler in ("adaptive", "topk", "uniform", "bernoulli", "poisson"):
        keep, pi = sample_units(scores, torch.tensor([2, 5, 1]), sampler=sampler, generator=gen())  # type: ignore[arg-type]
        assert keep.shape == scores.shape and bool(torch.isfinite(pi).all())
        if sampler not in ("bernoulli", "poisson"):
            assert keep.sum(1).tolist() == [2, 5, 1]


def test_topk_keeps_the_largest() -> None:
    scores = torch.tensor([[0.1, 5.0, 0.3, 2.0, 0.0]])
    keep, pi = sample_units(scores, torch.tensor([2]), sampler="topk", generator=gen())
    assert keep[0].tolist() == [False, True, False, True, False]
    assert bool((pi == 1).all())


def _many(scores: list[float], reps: int) -> torch.Tensor:
    return torch.tensor(scores).expand(reps, len(scores)).contiguous()


def test_adaptive_matches_sequential_multinomial() -> None:
    """Gumbel-top-n gives the inclusion frequencies of torch.multinomial without replacement."""
    scores = [5.0, 3.0, 1.0, 0.5, 0.5, 0.0, 2.0]
    reps, n = 40_000, 3
    keep, _ = sample_units(_many(scores, reps), torch.full((reps,), n), generator=gen(1))
    ours = keep.float().mean(0)
    draws = torch.multinomial(_many(scores, reps), n, replacement=False, generator=gen(2))
    ref = torch.zeros(reps, len(scores)).scatter_(1, draws, 1.0).mean(0)
    torch.testing.assert_close(ours, ref, atol=0.015, rtol=0)


@pytest.mark.parametrize("sampler", ["adaptive", "poisson", "uniform"])
def test_inverse_inclusion_is_unbiased(sampler: str) -> None:
    """Monte-Carlo: E[w_j] = 1 for every unit, so the mean masked gradient is the full gradient."""
    scores = [4.0, 2.0, 1.0, 0.5, 0.25, 0.2, 0.05, 3.0]
    reps, n = 60_000, 3
    s = _many(scores, reps)
    keep, pi = sample_units(s, torch.full((reps,), n), sampler=sampler, generator=gen(3))  # type: ignore[arg-type]
    w = inverse_inclusion_weights(keep, pi, max_weight=None)
    mean = w.mean(0)
    stderr = w.std(0) / math.sqrt(reps)
    assert bool(((mean - 1).abs() <= 4.5 * stderr + 1e-3).all()), (mean, stderr)
    grad = torch.randn(len(scores), generator=gen(4))
    torch.testing.assert_close(
        (w * grad).mean(0), grad, atol=float(6 * (stderr * grad.abs()).max()) + 1e-3, rtol=0
    )


def test_first_order_inclusion_is_biased_for_peaked_scores() -> None:
    scores = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    reps = 40_000
    keep, pi = sample_units(
        _many(scores, reps), torch.full((reps,), 2), generator=gen(5), inclusion="first_order"
    )
    mean = inverse_inclusion_weights(keep, pi, max_weight=None).mean(0)
    # docs/amss.md quotes these: the heavy unit about 0.90, the light ones about 1.63-1.66 (not 1)
    assert float(mean[0]) < 0.95 and bool((mean[1:] > 1.5).all()), mean


@SETTINGS
@given(padded_rows())
def test_water_filling_is_exact(rows: tuple) -> None:
    scores, valid, n = rows
    pi = water_filling(scores, n, valid)
    torch.testing.assert_close(pi.sum(1), n.float(), atol=1e-4, rtol=1e-5)
    assert bool(((pi >= 0) & (pi <= 1)).all()) and not bool((pi[~valid] != 0).any())
    for r in range(scores.shape[0]):
        v = valid[r]
        s, p = scores[r][v], pi[r][v]
        free = (p < 1 - 1e-6) & (s > 0)
        if s.sum() > 0 and free.any():
            c = (p[free] / s[free]).mean()
            torch.testing.assert_close(p[free], c * s[free], rtol=1e-4, atol=1e-6)  # proportional
            capped = p >= 1 - 1e-6
            assert bool((c * s[capped] >= 1 - 1e-4).all())  # capped units would exceed 1


def test_poisson_and_bernoulli_frequencies() -> None:
    scores = [4.0, 2.0, 1.0, 1.0, 0.0]
    reps = 40_000
    keep, pi = sample_units(_many(scores, reps), torch.full((reps,), 2), sampler="poisson", generator=gen(6))
    torch.testing.assert_close(keep.float().mean(0), pi[0], atol=0.012, rtol=0)
    assert keep.sum(1).float().mean().item() == pytest.approx(2.0, abs=0.02)
    keep, pi = sample_units(
        _many(scores, reps), torch.full((reps,), 2), sampler="bernoulli", generator=gen(7)
    )
    torch.testing.assert_close(keep.float().mean(0), torch.tensor(scores) / sum(scores), atol=0.012, rtol=0)


def test_same_generator_state_same_sample() -> None:
    s = torch.rand(4, 9, generator=gen(8))
    n = torch.tensor([1, 3, 5, 9])
    for sampler in ("adaptive", "uniform", "poisson", "bernoulli"):
        a = sample_units(s, n, sampler=sampler, generator=gen(9))  # type: ignore[arg-type]
        b = sample_units(s, n, sampler=sampler, generator=gen(9))  # type: ignore[arg-type]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_weights_formulas() -> None:
    keep = torch.tensor([[True, False, True]])
    pi = torch.tensor([[0.5, 0.2, 0.01]])
    assert inverse_inclusion_weights(keep, pi, max_weight=10.0).tolist() == [[2.0, 0.0, 10.0]]
    q = torch.tensor([[0.5, 0.3, 0.2]])
    w = code_weights(keep, q, torch.tensor([3]), bias=0.2)
    torch.testing.assert_close(w, torch.tensor([[1 / (0.5 + 1 / 3 + 0.2), 0.0, 1 / (0.2 + 1 / 3 + 0.2)]]))


def test_unit_score_modes() -> None:
    sq, wsq = torch.tensor([4.0, 0.0, 9.0]), torch.tensor([2.0, 1.0, 3.0])
    torch.testing.assert_close(unit_scores(sq), sq)
    torch.testing.assert_close(unit_scores(sq, "sqrt_gn"), torch.tensor([2.0, 0.0, 3.0]))
    torch.testing.assert_close(unit_scores(sq, "gn_wn", wsq), torch.tensor([2.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="weight_sq_norm"):
        unit_scores(sq, "gn_wn")
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_units(sq.view(1, -1), torch.tensor([1]), sampler="random")  # type: ignore[arg-type]
