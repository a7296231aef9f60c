"""Metrics computed against independent formulas."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.metrics import accuracy, fit_linear_probe, imbalance, macro_f1, probe_accuracy


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=50))
def test_macro_f1_matches_per_class_definition(pairs) -> None:
    pred = torch.tensor([p for p, _ in pairs])
    target = torch.tensor([t for _, t in pairs])
    f1s = []
    for c in range(4):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        f1s.append(0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    assert abs(macro_f1(pred, target, 4) - sum(f1s) / 4) < 1e-9


def test_accuracy_and_imbalance() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == 2 / 3
    assert imbalance({"a": 0.9, "b": 0.6, "c": 0.8}) == 0.9 - 0.6


def test_linear_probe_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(120, 5, generator=g) * 0.3
    x[:, 0] += 3 * y
    probe = fit_linear_probe(x, y, 3)
    assert probe_accuracy(probe, x, y) > 0.95
    noise, fresh = torch.randn(120, 5, generator=g), torch.randn(120, 5, generator=g)
    assert probe_accuracy(fit_linear_probe(noise, y, 3), fresh, y) < 0.6  # no signal: near chance
