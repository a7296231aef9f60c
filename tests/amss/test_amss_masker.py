"""The vectorised masker: exact kept counts per tensor and row, zeroed drops, weights, skips and stats."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_toy_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from equimodal.amss.masker import MASK_STATS, GradientMasker
from equimodal.amss.units import UnitTensor, discover_units


class Enc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3)
        self.conv_b = nn.Conv1d(3, 7, 2)
        self.attn = nn.MultiheadAttention(8, 4)
        self.out_dim = 8


def build(k_seed: int = 0) -> tuple[nn.Module, dict[str, list[UnitTensor]]]:
    torch.manual_seed(k_seed)
    model = make_toy_model(2, num_classes=5)
    model.encoders["m0"].extra = Enc()
    return model, discover_units(model, ["m0", "m1"])


def set_grads(units: dict[str, list[UnitTensor]], seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    saved = {}
    for u in [u for us in units.values() for u in us]:
        if u.param.grad is None or id(u.param) not in saved:
            u.param.grad = torch.randn(u.param.shape, generator=g) + 0.1
            saved[id(u.param)] = u.param.grad.clone()
    return saved


def kept_units(u: UnitTensor, grad: torch.Tensor) -> torch.Tensor:
    """Bool (groups, units): which units still hold a non-zero gradient."""
    return (u.sq_norms(grad) > 0).view(u.groups, u.units)


@settings(max_examples=25, deadline=None)
@given(
    st.floats(0.1, 1.0),
    st.floats(0.1, 1.0),
    st.sampled_from(["adaptive", "topk", "uniform"]),
    st.integers(0, 50),
)
def test_exactly_ceil_k_n_kept_and_dropped_grads_exactly_zero(
    k0: float, k1: float, sampler: str, seed: int
) -> None:
    model, units = build()
    saved = set_grads(units, seed)
    masker = GradientMasker(units, sampler=sampler)  # type: ignore[arg-type]
    ratios = torch.tensor([k0, k1])
    stats, finite = masker.apply(ratios, torch.Generator().manual_seed(seed))
    assert bool(finite)
    for m, k in zip(("m0", "m1"), ratios.tolist(), strict=True):
        for u in units[m]:
            grad = u.param.grad
            keep = kept_units(u, grad)
            expected = max(1, math.ceil(k * u.units - 1e-6 * k * u.units))
            assert keep.sum(1).tolist() == [expected] * u.groups, (u.name, k)
            # kept units are untouched, dropped ones exactly zero
            view, ref = u.unit_view(grad), u.unit_view(saved[id(u.param)])
            mask = u.mask_view(keep.reshape(u.grid_shape).to(grad.dtype))
            assert torch.equal(view, ref * mask)
    assert stats.shape == (len(MASK_STATS), 2)


def test_inverse_inclusion_scales_kept_units_by_their_weight() -> None:
    _, units = build()
    saved = set_grads(units, 1)
    masker = GradientMasker(units, reweight="inverse_inclusion", max_weight=10.0)
    stats, _ = masker.apply(torch.tensor([0.3, 0.6]), torch.Generator().manual_seed(0))
    ratios = []
    for u in [u for us in units.values() for u in us]:
        view, ref = u.unit_view(u.param.grad), u.unit_view(saved[id(u.param)])
        r = (view / ref).reshape(-1)
        ratios.append(r)
        assert bool(((r == 0) | ((r >= 1 - 1e-5) & (r <= 10 + 1e-4))).all())
    assert stats[MASK_STATS.index("mean_weight")].min() >= 1.0


def test_code_weights_and_block_normalisation() -> None:
    _, units = build()
    set_grads(units, 2)
    for block in (False, True):
        masker = GradientMasker(units, reweight="code", code_block_norm=block)
        stats, _ = masker.apply(torch.tensor([0.5, 0.5]), torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(stats).all())
        assert stats[MASK_STATS.index("mean_weight")].max() > 1.0  # the official amplification


def test_nonfinite_gradients_skip_masking() -> None:
    _, units = build()
    saved = set_grads(units, 3)
    first = units["m0"][0].param
    first.grad[0].fill_(float("nan"))
    saved[id(first)] = first.grad.clone()
    masker = GradientMasker(units)
    stats, finite = masker.apply(torch.tensor([0.2, 0.2]), torch.Generator().manual_seed(0))
    assert not bool(finite)
    for u in [u for us in units.values() for u in us]:
        torch.testing.assert_close(u.param.grad, saved[id(u.param)], equal_nan=True)
    assert bool((stats[MASK_STATS.index("kept_fraction")] == 1).all())


def test_missing_grads_are_left_alone() -> None:
    _, units = build()
    set_grads(units, 4)
    units["m1"][0].param.grad = None
    stats, finite = GradientMasker(units).apply(torch.tensor([0.5, 0.5]), torch.Generator().manual_seed(0))
    assert bool(finite) and units["m1"][0].param.grad is None


def test_zero_gradients_do_not_crash() -> None:
    _, units = build()
    for u in [u for us in units.values() for u in us]:
        u.param.grad = torch.zeros_like(u.param)
    for sampler in ("adaptive", "topk", "uniform", "bernoulli", "poisson"):
        for rw in ("none", "inverse_inclusion", "code"):
            stats, finite = GradientMasker(units, sampler=sampler, reweight=rw).apply(  # type: ignore[arg-type]
                torch.tensor([0.3, 0.7]), torch.Generator().manual_seed(0)
            )
            assert bool(finite) and bool(torch.isfinite(stats).all()), (sampler, rw)


def test_gn_wn_and_sqrt_scores_run() -> None:
    _, units = build()
    set_grads(units, 5)
    for score in ("gn_wn", "sqrt_gn"):
        stats, _ = GradientMasker(units, score=score).apply(torch.tensor([0.4, 0.4]), torch.Generator())  # type: ignore[arg-type]
        assert bool(torch.isfinite(stats).all())


def test_kept_grad_norm_fraction() -> None:
    _, units = build()
    set_grads(units, 6)
    full = {m: sum(float(u.sq_norms(u.param.grad).sum()) for u in us) for m, us in units.items()}
    stats, _ = GradientMasker(units).apply(torch.tensor([0.3, 0.3]), torch.Generator().manual_seed(1))
    after = {m: sum(float(u.sq_norms(u.param.grad).sum()) for u in us) for m, us in units.items()}
    for i, m in enumerate(units):
        assert stats[MASK_STATS.index("kept_grad_norm"), i].item() == pytest.approx(
            math.sqrt(after[m] / full[m]), rel=1e-4
        )
