"""Property tests of AMSS's significance: label entropy, feature entropy, MI rate, additive statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.amss.significance import (
    batch_sums,
    feature_entropy_from_sums,
    feature_entropy_per_sample,
    label_entropy,
    mutual_information_rate,
    significance,
    significance_from_sums,
)

SETTINGS = settings(max_examples=40, deadline=None)
counts_st = st.lists(st.integers(0, 20), min_size=2, max_size=8).filter(lambda c: sum(c) > 0)


@SETTINGS
@given(counts_st)
def test_exact_label_entropy_matches_definition(counts: list[int]) -> None:
    c = torch.tensor(counts, dtype=torch.float32)
    p = [x / sum(counts) for x in counts if x > 0]
    expected = -sum(q * math.log(q) for q in p)
    assert label_entropy(c).item() == pytest.approx(expected, abs=1e-5)
    assert label_entropy(c, "exact_bits").item() == pytest.approx(expected / math.log(2), abs=1e-5)
    assert 0.0 <= label_entropy(c).item() <= math.log(len(counts)) + 1e-5
    assert label_entropy(3 * c).item() == pytest.approx(label_entropy(c).item(), abs=1e-6)


@SETTINGS
@given(counts_st)
def test_av_code_label_entropy_is_the_quirk(counts: list[int]) -> None:
    c = torch.tensor(counts, dtype=torch.float32)
    last = max(i for i, x in enumerate(counts) if x > 0)
    p = [x / sum(counts) for x in counts[: last + 1]]
    expected = math.log(sum(math.exp(q) for q in p)) - sum(q * q for q in p)
    assert label_entropy(c, "av_code").item() == pytest.approx(expected, abs=1e-5)
    # classes above the largest label present do not count (histogram length = max label + 1)
    padded = torch.cat([c[: last + 1], torch.zeros(3)])
    assert label_entropy(padded, "av_code").item() == pytest.approx(expected, abs=1e-5)


def test_av_code_label_entropy_examples_from_spec() -> None:
    assert label_entropy(torch.ones(6), "av_code").item() == pytest.approx(math.log(6), abs=1e-5)
    one_hot = torch.tensor([0.0, 0, 0, 0, 0, 4])
    assert label_entropy(one_hot, "av_code").item() == pytest.approx(math.log(math.e + 5) - 1, abs=1e-5)
    assert label_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-7)


def test_unknown_modes_raise() -> None:
    with pytest.raises(ValueError, match="label_entropy must be one of"):
        label_entropy(torch.ones(3), "bits")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature_entropy must be one of"):
        feature_entropy_from_sums(torch.ones(2), torch.tensor(1.0), "max")  # type: ignore[arg-type]


@SETTINGS
@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 1000))
def test_feature_entropy_per_sample(batch: int, dim: int, seed: int) -> None:
    h = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)) * 3
    ent = feature_entropy_per_sample(h)
    p = torch.softmax(h, 1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(1), rtol=1e-4, atol=1e-5)
    assert bool((ent >= -1e-6).all()) and bool((ent <= math.log(dim) + 1e-5).all())
    flat = feature_entropy_per_sample(torch.zeros(batch, dim))
    torch.testing.assert_close(flat, torch.full((batch,), math.log(dim)))


def test_feature_entropy_modes() -> None:
    sums, n = torch.tensor([8.0, 4.0]), torch.tensor(4.0)
    torch.testing.assert_close(feature_entropy_from_sums(sums, n, "mean"), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(feature_entropy_from_sums(sums, n, "none"), torch.ones(2))
    torch.testing.assert_close(feature_entropy_from_sums(sums, n, "nv_code"), sums / math.log(2) / 40)


def test_mi_rate_and_separate_fallback_offset() -> None:
    mi, hx = torch.tensor([0.2, -0.4]), torch.tensor([2.0, 4.0])
    rho, fb = mutual_information_rate(mi, hx, offset=0.5)
    torch.testing.assert_close(rho, (mi + 0.5) / hx)
    assert not bool(fb)
    _, fb = mutual_information_rate(mi, hx, offset=0.5, fallback_offset=0.4)
    assert bool(fb)  # -0.4 + 0.4 <= 0 fires although the ratio offset keeps rho positive
    _, fb = mutual_information_rate(torch.tensor([0.2, -0.6]), hx, offset=0.5)
    assert bool(fb)


def _batch(
    seed: int, n: int, classes: int = 4
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    logits = {m: torch.randn(n, classes, generator=g) for m in ("a", "v", "t")}
    feats = {m: torch.randn(n, 5 + i, generator=g) for i, m in enumerate(("a", "v", "t"))}
    return logits, torch.randint(0, classes, (n,), generator=g), feats


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(1, 8))
def test_micro_batches_add_up_to_one_batch(seed: int, n1: int, n2: int) -> None:
    l1, y1, f1 = _batch(seed, n1)
    l2, y2, f2 = _batch(seed + 1, n2)
    mods = ["a", "v", "t"]
    both = batch_sums(l1, y1, f1, mods) + batch_sums(l2, y2, f2, mods)
    joint = significance(
        {m: torch.cat([l1[m], l2[m]]) for m in mods},
        torch.cat([y1, y2]),
        {m: torch.cat([f1[m], f2[m]]) for m in mods},
    )
    split = significance_from_sums(both, 3)
    for key in ("rho", "mi", "ce", "feature_entropy", "label_entropy"):
        torch.testing.assert_close(split[key], joint[key], rtol=1e-5, atol=1e-5)
    assert bool(split["fallback"]) == bool(joint["fallback"])


def test_significance_matches_definition() -> None:
    logits, y, feats = _batch(3, 12)
    out = significance(logits, y, feats, offset=0.5)
    counts = torch.bincount(y, minlength=4).float()
    h_y = label_entropy(counts)
    for i, m in enumerate(logits):
        mi = h_y - F.cross_entropy(logits[m], y)
        hx = feature_entropy_per_sample(feats[m]).mean()
        assert out["rho"][i].item() == pytest.approx(((mi + 0.5) / hx).item(), rel=1e-5, abs=1e-6)
    no_den = significance(logits, y, None, feature_entropy_mode="none", offset=0.0)
    torch.testing.assert_close(no_den["rho"], no_den["mi"])


def test_missing_features_is_a_clear_error() -> None:
    logits, y, _ = _batch(0, 4)
    with pytest.raises(ValueError, match="feature_entropy='none'"):
        significance(logits, y, None)
