"""Property tests of AMSS's update ratios: M = 2 sigmoid form, direction, clamp, fallback and NaN paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.amss.ratios import update_ratios

SETTINGS = settings(max_examples=60, deadline=None)
rho_st = st.floats(-5.0, 5.0, allow_nan=False)
temp_st = st.floats(0.05, 3.0)


@SETTINGS
@given(rho_st, rho_st, temp_st)
def test_two_modalities_equal_sigmoid_of_the_difference(r0: float, r1: float, t: float) -> None:
    k = update_ratios(torch.tensor([r0, r1], dtype=torch.float64), t, k_min=1e-300, k_max=1.0)
    for m, (own, other) in enumerate(((r0, r1), (r1, r0))):
        expected = 1.0 / (1.0 + math.exp(-(other - own) / t))
        assert k[m].item() == pytest.approx(min(max(expected, 1e-300), 1.0), rel=1e-9, abs=1e-12)
    neg = update_ratios(
        torch.tensor([r0, r1], dtype=torch.float64), t, form="softmax_neg", k_min=1e-300, k_max=1.0
    )
    torch.testing.assert_close(neg, k)


@SETTINGS
@given(st.lists(rho_st, min_size=2, max_size=6), temp_st)
def test_dominant_modality_gets_the_smaller_ratio(rho: list[float], t: float) -> None:
    k = update_ratios(torch.tensor(rho, dtype=torch.float64), t)
    for i in range(len(rho)):
        for j in range(len(rho)):
            if rho[i] > rho[j]:
                assert k[i] <= k[j]
    own = update_ratios(torch.tensor(rho, dtype=torch.float64), t, form="softmax_own")
    for i in range(len(rho)):
        for j in range(len(rho)):
            if rho[i] > rho[j]:
                assert own[i] >= own[j]  # bug B1 reverses the direction


@SETTINGS
@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=6), temp_st)
def test_sums_without_clamp(rho: list[float], t: float) -> None:
    r = torch.tensor(rho, dtype=torch.float64)
    k = update_ratios(r, t, k_min=1e-300, k_max=1.0)
    assert k.sum().item() == pytest.approx(len(rho) - 1, rel=1e-9)
    neg = update_ratios(r, t, form="softmax_neg", k_min=1e-300, k_max=1.0)
    assert neg.sum().item() == pytest.approx(1.0, rel=1e-9)


@SETTINGS
@given(st.lists(rho_st, min_size=2, max_size=6), temp_st, st.floats(-0.5, 0.5))
def test_clamped_to_bounds(rho: list[float], t: float, bias: float) -> None:
    k = update_ratios(torch.tensor(rho), t, bias=bias, k_min=0.1, k_max=0.9)
    assert bool(((k >= 0.1) & (k <= 0.9)).all())


def test_clamp_path_hits_the_bounds() -> None:
    k = update_ratios(torch.tensor([10.0, 0.0]), 0.2)
    torch.testing.assert_close(k, torch.tensor([0.1, 0.9]))


def test_fallback_and_nan_paths() -> None:
    rho = torch.tensor([0.3, 0.2])
    torch.testing.assert_close(update_ratios(rho, 0.2, fallback=torch.tensor(True)), torch.full((2,), 0.5))
    torch.testing.assert_close(update_ratios(rho, 0.2, fallback=False), update_ratios(rho, 0.2))
    per_mod = update_ratios(
        torch.tensor([0.3, 0.2, 0.1]), 0.2, fallback=True, fallback_ratio=torch.tensor([0.2, 0.3, 0.4])
    )
    torch.testing.assert_close(per_mod, torch.tensor([0.2, 0.3, 0.4]))
    nan = update_ratios(torch.tensor([float("nan"), 0.2]), 0.2, fallback_ratio=0.7)
    torch.testing.assert_close(nan, torch.full((2,), 0.7))
    inf = update_ratios(torch.tensor([float("inf"), 0.2]), 0.2)
    assert bool(torch.isfinite(inf).all())


def test_stable_softmax_versus_raw_exp_overflow() -> None:
    rho = torch.tensor([30.0, 29.0])  # rho / T = 150: exp overflows in float32
    stable = update_ratios(rho, 0.2)
    torch.testing.assert_close(stable, torch.tensor([0.1, 0.9]))
    raw = update_ratios(rho, 0.2, stable=False)
    torch.testing.assert_close(raw, torch.full((2,), 0.5))  # the code's NaN -> 0.5


def test_worked_example_from_spec() -> None:
    k = update_ratios(torch.tensor([0.30, 0.20], dtype=torch.float64), 0.2)
    assert k[0].item() == pytest.approx(1 / (1 + math.exp(0.5)), abs=1e-9)
    assert k[1].item() == pytest.approx(1 - 1 / (1 + math.exp(0.5)), abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"k_min": 0.0}, r"k_min must lie in \(0, 1\]"),
        ({"k_max": 1.5}, r"k_max must lie in \(0, 1\]"),
        ({"k_min": 0.8, "k_max": 0.5}, "k_min"),
        ({"form": "softmax"}, "ratio form must be one of"),
    ],
)
def test_bad_options(kwargs: dict[str, object], match: str) -> None:
    args = {"temperature": 0.2, **kwargs}
    t = args.pop("temperature")
    with pytest.raises(ValueError, match=match):
        update_ratios(torch.tensor([0.1, 0.2]), t, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        update_ratios(torch.tensor([0.1]), 0.2)
